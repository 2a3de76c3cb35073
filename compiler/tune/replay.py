"""Replay a workload's request trace against the engine core, in this process, and measure it.

A replay feeds the trace's requests to an EngineCore with one point's runtime settings: closed
loop (a new request starts when one of `concurrency` finishes) or open loop (each at its arrival
time, queueing included in its time to first token). Every step, each request's generated token
count is read; a token's time is the step's end, so time to first token is first token - arrival,
and inter-token latency is the gap between a request's steps divided by the tokens that step gave
it (a speculative step gives several). Generation ignores end-of-sequence (every request runs to
its max_new_tokens), so each point does the same work. Prompts are windows of real text
(`realise`), so prompt-lookup speculation sees text, not random ids.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from compiler.runtime.core import EngineCore
from compiler.runtime.generation import GenerationConfig
from compiler.runtime.settings import RuntimeSettings
from compiler.tune.pareto import Measurement
from compiler.tune.trace import TraceRequest, make_trace
from compiler.tune.workload import Workload


def realise(trace: list[TraceRequest], text_ids: np.ndarray, w: Workload) -> list[TraceRequest]:
    """The trace with each prompt replaced by tokenised text of the same length: its shared part
    (round(shared_prefix * length) tokens, as make_trace draws it) one text common to every
    request, the rest a window of its own; seeded by the workload."""
    rng = np.random.default_rng(w.seed + 1)
    longest = max((len(r.prompt) for r in trace), default=1)
    prefix_text = _window(text_ids, longest, rng)
    out = []
    for r in trace:
        shared = round(w.shared_prefix * len(r.prompt))
        own = _window(text_ids, len(r.prompt) - shared, rng)
        out.append(dataclasses.replace(r, prompt=tuple(int(t) for t in np.concatenate([prefix_text[:shared], own]))))
    return out


def _window(ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= 0:
        return ids[:0]
    if len(ids) <= n:
        return np.resize(ids, n)
    start = int(rng.integers(0, len(ids) - n))
    return ids[start:start + n]


@dataclass
class _Live:
    arrived: float
    last: float = 0.0
    count: int = 0
    ttft: float | None = None


def replay(engine, trace: list[TraceRequest], workload: Workload, settings: RuntimeSettings, clock=time.perf_counter) -> Measurement:
    """One replay of `trace` on `engine` with `settings`; the engine's own threads are used (load
    it with settings.threads)."""
    core = settings.core(engine)
    todo = deque(trace)
    live: dict[int, _Live] = {}
    ttfts, gaps, produced = [], [], 0
    t0 = clock()
    while todo or core.has_work:
        _admit(core, todo, live, workload, t0, clock)
        if not core.has_work:
            time.sleep(max(0.0, t0 + todo[0].arrival_s - clock()))  # open loop: idle until the next arrival
            continue
        outs = core.step()
        now = clock()
        counts = core.generated()
        counts.update({o.request_id: len(o.generation.token_ids) for o in outs if o.finished and o.generation is not None})
        for rid, n in counts.items():
            st = live.get(rid)
            if st is None or n <= st.count:
                continue
            new = n - st.count
            if st.ttft is None:
                st.ttft = now - st.arrived
                ttfts.append(st.ttft)
                new -= 1
            gaps += [(now - st.last) / max(new, 1)] * new
            st.count, st.last = n, now
        for o in outs:
            if o.finished:
                st = live.pop(o.request_id, None)
                if st is not None:
                    produced += st.count
    wall = clock() - t0
    ms = lambda xs, q: float(np.percentile(xs, q) * 1e3) if xs else 0.0  # noqa: E731
    return Measurement(produced / wall if wall > 0 else 0.0, ms(ttfts, 99), ms(gaps, 99), ms(ttfts, 50), ms(gaps, 50), wall)


def _admit(core: EngineCore, todo: deque, live: dict, w: Workload, t0: float, clock) -> None:
    """Closed loop: keep `concurrency` requests in flight. Open loop: add every request whose
    arrival time has come (its arrival, not this moment, starts its time to first token)."""
    while todo:
        r = todo[0]
        if w.arrival.closed_loop:
            if len(live) >= w.arrival.concurrency:
                return
            arrived = clock()
        else:
            arrived = t0 + r.arrival_s
            if arrived > clock():
                return
        todo.popleft()
        cfg = GenerationConfig.of(max_new_tokens=r.max_new_tokens, ignore_eos=True)
        rid = core.add_request(list(r.prompt), cfg)
        live[rid] = _Live(arrived, arrived)


def workload_trace(engine, w: Workload) -> list[TraceRequest]:
    """The workload's seeded trace for this engine: its lengths within max_seq, its end-of-sequence
    ids never in a prompt, the prompts realised as text."""
    cfg = engine.config
    trace = make_trace(w, cfg.vocab_size, cfg.max_seq, frozenset(cfg.generation.eos_token_ids))
    return realise(trace, corpus_ids(engine), w)


def corpus_ids(engine, chars: int = 400_000) -> np.ndarray:
    """Tokenised English text from the standard library's documentation (offline), for realise()."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics.values())[:chars]
    return np.asarray(engine.text.encode(text), dtype=np.int64)
