"""The engine core: greedy outputs equal a plain one-prompt decode loop, whatever the batching,
chunk size, call packing, arrival time, KV budget or prefix reuse; rows, blocks and their memory
are all free afterwards; cancel frees a row; a request the KV budget can never hold is refused.

Each test runs on the tiny llama engine (contrib and standard graphs, and cut at kiln's attention
kernel with fp32 and int8 rows) and on the fake session (tests/runtime/fake_session.py), whose
output is a hash of its whole KV row: a KV slip shows."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.runtime import load
from compiler.runtime.core import EngineCore, SchedulerConfig
from compiler.runtime.generation import GenerationConfig
from compiler.runtime.kv_memory import SCALED, KVBlocks, token_bytes
from tests.runtime import fake_session

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there lived", "def f(x):", "A"]
N = 12


def reference(engine, ids: list[int], n: int) -> list[int]:
    """The simplest decode loop: batch 1, the whole prompt at once, then one token a step."""
    s = engine.session
    io = s.binding(s.new_cache(1))
    logits = s.step(io, np.array([ids]), np.arange(len(ids))[None])
    out, pos = [], len(ids)
    for _ in range(n):
        tok = int(logits[0, -1].argmax())
        if tok in engine.config.generation.eos_token_ids:
            break
        out.append(tok)
        logits = s.step(io, np.array([[tok]]), np.array([[pos]]))
        pos += 1
    return out


def drain(core: EngineCore) -> dict[int, list[int]]:
    got = {}
    while core.has_work:
        for o in core.step():
            if o.finished:
                got[o.request_id] = o.generation.token_ids
    return got


@pytest.fixture(scope="module", params=["fake", "fake-single-token-rows", "contrib", "standard", "kiln", "kiln-int8"])
def engine(request, tiny_artifacts):
    if request.param.startswith("fake"):
        return fake_session.FakeEngine(multi_token_rows=request.param == "fake")
    return load(tiny_artifacts[("llama", request.param)])


@pytest.fixture(scope="module")
def refs(engine):
    return [reference(engine, engine.text.prompt_ids(p, False), N) for p in PROMPTS]


@pytest.mark.parametrize("budget", [1, 3, 16, 512])
def test_batched_and_chunked_prefill_equal_the_plain_loop(engine, refs, budget):
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget))
    rids = [core.add_request(engine.text.prompt_ids(p, False), GenerationConfig(max_new_tokens=N)) for p in PROMPTS]
    got = drain(core)
    assert [got[r] for r in rids] == refs
    assert core.kv.free_rows == core.kv.rows.rows and not core.scheduler.running


def test_fewer_rows_than_requests_queue_and_finish(engine, refs):
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8))
    rids = [core.add_request(engine.text.prompt_ids(p, False), GenerationConfig(max_new_tokens=N)) for p in PROMPTS]
    got = drain(core)
    assert [got[r] for r in rids] == refs
    assert core.kv.free_rows == 2


def test_a_prompt_arriving_mid_decode_changes_nothing(engine, refs):
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=6))
    first = core.add_request(engine.text.prompt_ids(PROMPTS[0], False), GenerationConfig(max_new_tokens=N))
    got = {}
    for _ in range(5):
        for o in core.step():
            if o.finished:
                got[o.request_id] = o.generation.token_ids
    late = core.add_request(engine.text.prompt_ids(PROMPTS[1], False), GenerationConfig(max_new_tokens=N))
    got.update(drain(core))
    assert got[first] == refs[0] and got[late] == refs[1]


def test_prefix_reuse_is_exact_and_saves_prefill(engine):
    header = "You are a helpful assistant. Answer briefly and precisely. " * 6
    prompts = [engine.text.prompt_ids(header + q, False) for q in ("What is 2+2?", "Name a river.", "Say hi.")]
    refs = [reference(engine, p, N) for p in prompts]
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64, prefix_cache_tokens=1024,
                                              prefix_block_size=8))
    rids = [core.add_request(p, GenerationConfig(max_new_tokens=N)) for p in prompts]
    got = drain(core)
    assert [got[r] for r in rids] == refs
    shared = min(len(p) for p in prompts) // 8 * 8
    assert core.stats["prefill_tokens"] <= sum(len(p) for p in prompts) - 2 * (shared - 8)
    assert core.kv.prefix.hit_rate > 0.5
    again = core.add_request(prompts[0], GenerationConfig(max_new_tokens=N))  # a repeat: all but the tail reused
    assert drain(core)[again] == refs[0]
    assert core.kv.free_rows == 3


def test_cancel_frees_the_row_at_the_next_step(engine, refs):
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=1))
    a = core.add_request(engine.text.prompt_ids(PROMPTS[0], False), GenerationConfig(max_new_tokens=200))
    b = core.add_request(engine.text.prompt_ids(PROMPTS[1], False), GenerationConfig(max_new_tokens=N))
    core.step()
    core.step()
    core.cancel(a)
    outs = core.step()
    assert any(o.request_id == a and o.finished and o.generation.finish_reason == "cancelled" for o in outs)
    assert drain(core)[b] == refs[1]
    assert core.stats["cancelled"] == 1 and core.kv.free_rows == 1


def test_a_bad_request_is_refused_alone(engine, refs):
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=2))
    ok = core.add_request(engine.text.prompt_ids(PROMPTS[0], False), GenerationConfig(max_new_tokens=N))
    M = engine.config.max_seq
    with pytest.raises(ValueError, match=f"1..{M - 1} tokens"):
        core.add_request([5] * M, GenerationConfig())
    with pytest.raises(ValueError, match="seed"):
        core.add_request([5], GenerationConfig(seed=-1))
    with pytest.raises(ValueError, match="top_p"):
        core.add_request([5], GenerationConfig(top_p=0.0))
    assert drain(core)[ok] == refs[0]


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(engine):
    cfg = GenerationConfig(max_new_tokens=N, temperature=0.9, top_k=20, seed=7)
    alone = EngineCore(engine)
    r = alone.add_request(engine.text.prompt_ids(PROMPTS[2], False), cfg)
    solo = drain(alone)[r]
    crowd = EngineCore(engine, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=5))
    others = [crowd.add_request(engine.text.prompt_ids(p, False), GenerationConfig(max_new_tokens=N, temperature=1.0, seed=i))
              for i, p in enumerate(PROMPTS[:2])]
    mine = crowd.add_request(engine.text.prompt_ids(PROMPTS[2], False), cfg)
    got = drain(crowd)
    assert got[mine] == solo and all(o in got for o in others)


def test_a_kv_budget_too_small_for_a_request_is_refused_clearly(engine):
    kv = engine.config.kv_cache
    block = KVBlocks.for_cache(kv, None)
    n = 2 if 2 * block.block_tokens < engine.config.max_seq else 1  # int8 rows of head_dim 16: 256-token blocks
    gib = n * block.block_bytes / 2**30
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=4, kv_cache_gib=gib))
    assert core.kv.blocks.capacity == n
    too_long = [5] * (n * block.block_tokens)  # its prompt alone fills the pool: no room for a new token
    assert len(too_long) < engine.config.max_seq
    with pytest.raises(ValueError, match="KV budget .* holds .*raise --kv-cache-gib or lower max_tokens"):
        core.add_request(too_long, GenerationConfig(max_new_tokens=1))
    assert not core.has_work


def test_requests_wait_for_kv_blocks_and_finish_exactly(engine, refs):
    kv = engine.config.kv_cache
    block = KVBlocks.for_cache(kv, None)
    ids = [engine.text.prompt_ids(p, False) for p in PROMPTS]
    need = max(block.blocks_for(len(i) + N) for i in ids)
    gib = need * block.block_bytes / 2**30  # room for one request at a time, whatever the rows
    assert all(block.blocks_for(len(i) + N) * 2 > need for i in ids)
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=4, kv_cache_gib=gib))
    rids = [core.add_request(i, GenerationConfig(max_new_tokens=N)) for i in ids]
    got, most = {}, 0
    while core.has_work:
        for o in core.step():
            if o.finished:
                got[o.request_id] = o.generation.token_ids
        most = max(most, len(core.scheduler.running))
        assert core.kv.blocks.used <= core.kv.blocks.capacity
    assert [got[r] for r in rids] == refs and most == 1
    assert core.kv.blocks.used == 0 and core.kv.free_rows == 4


def test_host_rows_hold_memory_only_for_what_they_hold(engine, refs):
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=16))
    kv = engine.config.kv_cache
    paged = engine.session.kv_arrays(core.kv.rows.cache)  # one mapping per layer's keys and values (and scales)
    reserved = 16 * 2 * kv.num_layers * kv.num_kv_heads * kv.max_seq * token_bytes(kv)
    rids = [core.add_request(engine.text.prompt_ids(p, False), GenerationConfig(max_new_tokens=N)) for p in PROMPTS]
    peak = 0
    while core.has_work:
        core.step()
        peak = max(peak, core.kv.resident_bytes())
    per_token = 2 * kv_bytes_per_layer_token(engine) * engine.config.kv_cache.num_layers
    longest = max(len(engine.text.prompt_ids(p, False)) for p in PROMPTS) + N
    assert 0 < peak <= len(rids) * per_token * (longest + 2 * KVBlocks.for_cache(engine.config.kv_cache, None).block_tokens) \
        + 16 * len(paged) * 4096  # a dummy write may touch a free row's first page
    assert peak < reserved / (4 if kv.dtype in SCALED else 8)  # a scale row of 512 tokens is half a page: coarser
    assert core.kv.resident_bytes() <= 16 * len(paged) * 4096  # released rows went back to the OS


def kv_bytes_per_layer_token(engine) -> int:
    kv = engine.config.kv_cache
    return kv.num_kv_heads * token_bytes(kv)
