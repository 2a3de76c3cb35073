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
