"""Runtime behaviour: sampling, stop strings, batching, streaming, chat, in-place KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.runtime import load
from compiler.runtime.session import DecoderSession, KVCache

PROMPTS = ["The quick brown fox", "In the beginning of the module the interpreter reads", "x"]


@pytest.fixture(scope="module", params=["standard", "contrib"])
def engine(request, tiny_artifacts):
    return load(tiny_artifacts[("llama", request.param)])


def test_sampling_with_a_seed_is_reproducible(engine):
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, stop_token_ids=())
    a = engine.generate(PROMPTS[0], seed=7, **kw)
    b = engine.generate(PROMPTS[0], seed=7, **kw)
    c = engine.generate(PROMPTS[0], seed=8, **kw)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    assert a.token_ids != c.token_ids


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(PROMPTS[1], max_new_tokens=16, stop_token_ids=())
    top1 = engine.generate(PROMPTS[1], max_new_tokens=16, temperature=1.3, top_k=1, seed=3, stop_token_ids=())
    assert greedy.token_ids == top1.token_ids


def test_stop_string_ends_generation_before_it(engine):
    full = engine.generate(PROMPTS[0], max_new_tokens=40, stop_token_ids=())
    assert len(full.text) > 12
    stop = full.text[8:12]
    cut = engine.generate(PROMPTS[0], max_new_tokens=40, stop=[stop], stop_token_ids=())
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"


def test_stop_token_ends_generation(engine):
    full = engine.generate(PROMPTS[0], max_new_tokens=20, stop_token_ids=())
    stop_at = full.token_ids[5]
    cut = engine.generate(PROMPTS[0], max_new_tokens=20, stop_token_ids=(stop_at,))
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop_at)]
    assert cut.finish_reason == "stop"


def test_batch_of_different_lengths_matches_each_prompt_alone(engine):
    batch = engine.generate(PROMPTS, max_new_tokens=32, stop_token_ids=())
    for prompt, got in zip(PROMPTS, batch):
        alone = engine.generate(prompt, max_new_tokens=32, stop_token_ids=())
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text


def test_batch_sampling_matches_alone_for_greedy_rows_and_finishes_independently(engine):
    stop_at = engine.generate(PROMPTS[1], max_new_tokens=20, stop_token_ids=()).token_ids[3]
    batch = engine.generate(PROMPTS[:2], max_new_tokens=20, stop_token_ids=(stop_at,))
    alone = [engine.generate(p, max_new_tokens=20, stop_token_ids=(stop_at,)) for p in PROMPTS[:2]]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert batch[1].finish_reason == "stop"


def test_streaming_yields_the_same_text(engine):
    for prompt in PROMPTS:
        pieces = list(engine.stream(prompt, max_new_tokens=30, stop_token_ids=()))
        assert len(pieces) > 1
        assert "".join(pieces) == engine.generate(prompt, max_new_tokens=30, stop_token_ids=()).text


def test_chat_template_is_applied(engine):
    ids = engine.text.prompt_ids("hi there", chat=True)
    assert engine.text.decode(ids) == engine.text.decode(engine.text.encode("user\nhi there\nassistant\n"))
    assert engine.text.tokenizer.token_to_id("<|im_start|>") in ids
    assert engine.generate("hi there", chat=True, max_new_tokens=5, stop_token_ids=()).token_ids


def test_kv_cache_allocated_once_and_updated_in_place(engine, monkeypatch):
    made = []
    original = DecoderSession.new_cache

    def counting(self, batch):
        made.append(original(self, batch))
        return made[-1]

    seen = []  # row 0 of layer 0's keys when the finished sequence hands its row back
    release = KVCache.release_row

    def snapshot(self, row):
        seen.append(self._arrays[0][row].copy())  # [Nkv, M, D], the numpy buffer the bound OrtValue wraps
        release(self, row)

    monkeypatch.setattr(DecoderSession, "new_cache", counting)
    monkeypatch.setattr(KVCache, "release_row", snapshot)
    gen = engine.generate(PROMPTS[0], max_new_tokens=12, stop_token_ids=())
    assert len(made) == 1 and len(seen) == 1
    n_prompt = len(engine.text.encode(PROMPTS[0]))
    filled = np.abs(seen[0][0]).sum(axis=-1) > 0
    assert filled[: n_prompt + len(gen.token_ids) - 1].all()
    assert not filled[n_prompt + len(gen.token_ids):].any()
    assert not made[0]._arrays[0][0].any()  # released: its pages went back to the OS


def test_too_long_prompt_is_refused_and_a_big_batch_queues(engine):
    with pytest.raises(ValueError, match="max_seq"):
        engine.generate("word " * 400, max_new_tokens=4)
    prompts = ["a", "b c", "d e f", "g", "h i"]  # one more than max_batch: the fifth waits for a row
    assert [g.token_ids for g in engine.generate(prompts, max_new_tokens=4)] == \
        [engine.generate(p, max_new_tokens=4).token_ids for p in prompts]
