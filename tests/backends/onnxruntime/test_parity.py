"""Parity with Hugging Face transformers: logits and greedy tokens, both graph flavours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from compiler.runtime import load
from tests.conftest import TINY_ARCHS, english_text

NEW_TOKENS = 64
PROMPT = english_text()[1000:1200]


def hf_model(src):
    return transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


def engine_logits(engine, ids: np.ndarray) -> np.ndarray:
    s = engine.session
    cache = s.new_cache(ids.shape[0])
    io = s.binding(cache)
    every = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return s.step(io, ids, every, every)  # logits at every position


@pytest.mark.parametrize("graph", ["standard", "contrib"])
@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_logits_and_greedy_tokens_match_transformers(arch, graph, tiny_checkpoints, tiny_artifacts):
    model = hf_model(tiny_checkpoints[arch])
    engine = load(tiny_artifacts[(arch, graph)])
    ids = np.array([engine.text.encode(PROMPT)])
    assert 32 <= ids.shape[1] < 200
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    got = engine_logits(engine, ids)
    assert np.abs(got - ref).max() <= 1e-3

    with torch.no_grad():
        hf_tokens = model.generate(torch.from_numpy(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    gen = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_token_ids=())
    assert gen.token_ids == hf_tokens


# rope scaling variants, each against transformers on a tiny model (llama3 and partial rotary
# are covered by the `llama` and `phi3` checkpoints above)
ROPE_VARIANTS = {
    "linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "dynamic": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}),
    "longrope": ("phi3", {"max_position_embeddings": 1024, "original_max_position_embeddings": 256,
                          "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                              "short_factor": [1.0, 1.3, 1.9, 2.4], "long_factor": [2.0, 3.0, 4.0, 5.0],
                                              "original_max_position_embeddings": 256}}),
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_variant_matches_transformers(variant, tmp_path):
    from tests.conftest import build_artifact, make_tiny

    arch, overrides = ROPE_VARIANTS[variant]
    src = make_tiny(arch, tmp_path / variant, seed=1, **overrides)
    engine = load(build_artifact(src, tmp_path / "artifacts", variant, max_seq=256))
    model = hf_model(src)
    ids = np.array([engine.text.encode(PROMPT)])
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(engine_logits(engine, ids) - ref).max() <= 1e-3


@pytest.mark.parametrize("length", [8, 16, 17, 40])  # below, at, just above and well above the window
@pytest.mark.parametrize("arch", ["mistral_window16", "gemma3"])
def test_sliding_window_around_its_length(arch, length, tiny_checkpoints, tiny_artifacts):
    model = hf_model(tiny_checkpoints[arch])
    engine = load(tiny_artifacts[(arch, "contrib")])
    ids = np.array([engine.text.encode(PROMPT)[:length]])
    assert ids.shape[1] == length
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
        hf_tokens = model.generate(torch.from_numpy(ids), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, length:].tolist()
    assert np.abs(engine_logits(engine, ids) - ref).max() <= 1e-3
    s = engine.session
    io = s.binding(s.new_cache(1))
    last = s.step(io, ids, np.arange(length)[None])[0, -1]
    tokens = []
    for pos in range(length, length + 24):  # decode runs past the window
        tokens.append(int(last.argmax()))
        last = s.step(io, np.array([[tokens[-1]]]), np.array([[pos]]))[0, -1]
    assert tokens == hf_tokens
