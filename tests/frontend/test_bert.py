"""BERT encoders as embedding engines: against sentence-transformers (Transformer + mean Pooling)
on the same random-weight model, for BertModel and BertForMaskedLM checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.cli import main
from compiler.runtime import load
from tests.conftest import build_artifact, english_text
from tests.tiny_models import make_bert

TEXTS = ["The quick brown fox jumps over the lazy dog.", english_text()[2000:2600], "Short.",
         "Attention masks keep padding out of the mean."]


@pytest.fixture(scope="module", params=["BertModel", "BertForMaskedLM"])
def bert(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = make_bert(root / "src", request.param)
    return src, build_artifact(src, root / "artifacts", "bert", max_seq=256)


def test_embeddings_match_sentence_transformers(bert):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer import modules

    src, art = bert
    ref_model = st.SentenceTransformer(modules=[modules.Transformer(str(src)), modules.Pooling(64, "mean")], device="cpu")
    ref = ref_model.encode(TEXTS, batch_size=4, convert_to_numpy=True)
    got = load(art).embed(TEXTS)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert got.shape == ref.shape and cos.min() >= 0.9999, cos


def test_kiln_run_embed(bert, capsys):
    _, art = bert
    assert main(["run", str(art), "--embed", "--json", "--prompt", TEXTS[0], "--prompt", TEXTS[2]]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == [TEXTS[0], TEXTS[2]] and len(lines[0]["embedding"]) == 64


def test_encoder_refuses_quantization_and_tensorrt(bert, tmp_path):
    from compiler.errors import KilnError

    src, _ = bert
    with pytest.raises(KilnError, match="is an encoder"):
        build_artifact(src, tmp_path, "q", quantization={"scheme": "int8-wo"})
