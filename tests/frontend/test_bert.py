"""BERT encoders as embedding engines: against sentence-transformers (Transformer + mean Pooling)
on the same random-weight model, for BertModel and BertForMaskedLM checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.cli import main
from compiler.runtime import load
from tests.conftest import build_artifact, english_text

TEXTS = ["The quick brown fox jumps over the lazy dog.", english_text()[2000:2600], "Short.",
         "Attention masks keep padding out of the mean."]


def make_bert(out, arch: str):
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator([english_text()[:200_000]], trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials,
                                                                                   show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                          sep_token="[SEP]", mask_token="[MASK]")
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


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
