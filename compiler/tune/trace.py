"""A workload made concrete: a seeded, deterministic list of requests to replay against an engine.

Prompts are random token ids (the replay measures the engine, not the text), none of them an id
the caller asks to avoid (special tokens such as EOS; the replay ignores EOS anyway and runs each
request for exactly max_new_tokens). The first round(shared_prefix * length) tokens of every
prompt are the same prefix, drawn once, so a prefix cache sees the workload's system prompt.
Lengths are clipped to the engine's max_seq (prompt + max_new_tokens <= max_seq): the prompt
shrinks first, down to one token, then the reply. Arrivals are all at 0 in a closed loop (the
replay keeps `concurrency` in flight) and Poisson (exponential gaps of mean 1/rate) in an open one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.errors import KilnError
from compiler.tune.workload import Workload


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float  # seconds after the replay starts
    prompt: tuple[int, ...]
    max_new_tokens: int


def _allowed_ids(vocab_size: int, avoid_ids: frozenset[int]) -> np.ndarray:
    if vocab_size < 1:
        raise KilnError(f"vocab_size {vocab_size} is not positive", "pass the engine's vocabulary size")
    allowed = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.fromiter(avoid_ids, dtype=np.int64, count=len(avoid_ids)))
    if allowed.size == 0:
        raise KilnError(f"every token id of the vocabulary ({vocab_size}) is to be avoided",
                        "avoid only special tokens such as EOS")
    return allowed


def _clip(inputs: np.ndarray, outputs: np.ndarray, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """prompt + reply <= max_seq: the prompt shrinks first (to 1 token at least), then the reply."""
    prompts = np.clip(inputs, 1, np.maximum(max_seq - outputs, 1))
    return prompts, np.minimum(outputs, max_seq - prompts)


def _arrivals(w: Workload, rng: np.random.Generator) -> np.ndarray:
    n = w.requests
    if w.arrival.closed_loop:
        return np.zeros(n)
    gaps = rng.exponential(1.0 / w.arrival.rate_per_s, size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])  # the first request at 0: no idle start


def make_trace(w: Workload, vocab_size: int, max_seq: int, avoid_ids: frozenset[int] = frozenset()) -> list[TraceRequest]:
    """The workload's `requests` requests, the same for the same workload (seeded by w.seed)."""
    if max_seq < 2:
        raise KilnError(f"max_seq {max_seq} leaves no room for a prompt and a reply", "replay on an engine with max_seq >= 2")
    allowed = _allowed_ids(vocab_size, frozenset(avoid_ids))
    rng = np.random.default_rng(w.seed)
    inputs = w.input_tokens.sample(rng, w.requests)
    outputs = w.output_tokens.sample(rng, w.requests)
    prompts, replies = _clip(inputs, outputs, max_seq)
    arrivals = _arrivals(w, rng)
    shared = [round(w.shared_prefix * int(p)) for p in prompts]
    prefix = allowed[rng.integers(0, allowed.size, size=max(shared))]
    trace = []
    for i, (length, reply, own) in enumerate(zip(prompts.tolist(), replies.tolist(), shared)):
        rest = allowed[rng.integers(0, allowed.size, size=length - own)]
        tokens = np.concatenate([prefix[:own], rest]).tolist()
        trace.append(TraceRequest(index=i, arrival_s=float(arrivals[i]), prompt=tuple(tokens), max_new_tokens=int(reply)))
    return trace


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _reusable_prefixes(prompts: list[tuple[int, ...]]) -> list[int]:
    """For each prompt, its longest common prefix with any other prompt of the trace (what a prefix
    cache could reuse): in lexicographic order, the longest is with a neighbour."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    best = [0] * len(prompts)
    for a, b in zip(order, order[1:]):
        n = _common_prefix(prompts[a], prompts[b])
        best[a], best[b] = max(best[a], n), max(best[b], n)
    return best


def summary(trace: list[TraceRequest]) -> dict:
    """count; input and output tokens (mean, p50, p99); shared_prefix_tokens (the prefix every
    prompt starts with); reusable_prefix_tokens (mean, per prompt, of its longest common prefix
    with another prompt); totals and the last arrival."""
    inputs = np.array([len(r.prompt) for r in trace], dtype=np.int64)
    outputs = np.array([r.max_new_tokens for r in trace], dtype=np.int64)
    prompts = [r.prompt for r in trace]
    common = min((_common_prefix(prompts[0], p) for p in prompts[1:]), default=0)
    reusable = _reusable_prefixes(prompts)
    return {
        "count": len(trace),
        "input_tokens": _stats(inputs),
        "output_tokens": _stats(outputs),
        "shared_prefix_tokens": common,
        "reusable_prefix_tokens": float(np.mean(reusable)) if reusable else 0.0,
        "total_input_tokens": int(inputs.sum()),
        "total_output_tokens": int(outputs.sum()),
        "last_arrival_s": max((r.arrival_s for r in trace), default=0.0),
    }


__all__ = ["TraceRequest", "make_trace", "summary"]
