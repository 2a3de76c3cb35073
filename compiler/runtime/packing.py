"""Packing one step's work into engine calls over contiguous row spans.

A call binds rows [lo, hi) and feeds each S tokens ([hi - lo, S], shorter inputs padded, rows
without work fed a dummy). What it costs is roughly a fixed part, reading every weight once, plus
the tokens it computes, (hi - lo) * S; on a small model on CPU the fixed part is about what 32
tokens cost (fp32 SmolLM2-135M, 2 cores: 25 ms a call, 0.8 ms a prompt token). So the decodes
and a few short prompt chunks are cheaper as one padded call, and a long chunk is cheaper alone.
`pack` merges neighbouring calls (in row order) while the merge saves cost.
"""

from __future__ import annotations

from typing import Callable

CALL_COST_TOKENS = 32  # an engine call's fixed cost, in tokens computed

Call = dict  # row -> (request, tokens fed this call)


def pack(calls: list[Call], start: Callable[[int], int], max_seq: int, mixed: bool = True) -> list[Call]:
    """Merge neighbouring calls while cheaper. start(row): the position a row's input begins at;
    a merge is refused if padding would run a row past max_seq (positions are never clamped).
    mixed: the engine takes several rows of several new tokens each over a past. ONNX Runtime's
    GroupQueryAttention on CPU does not ("batch_size must be 1 when sequence_length > 1 and past
    context is given"): there a call of several rows feeds one token a row, or fresh prompts only."""
    calls = sorted(calls, key=min)
    shape = [(min(c), max(c) + 1, max(len(t) for _, t in c.values())) for c in calls]  # lo, hi, S
    while len(calls) > 1:
        best, gain = None, 0
        for i in range(len(calls) - 1):
            (lo1, hi1, s1), (lo2, hi2, s2) = shape[i], shape[i + 1]
            merged = (min(lo1, lo2), max(hi1, hi2), max(s1, s2))
            saved = _cost(shape[i]) + _cost(shape[i + 1]) - _cost(merged)
            if not mixed and merged[2] > 1 and any(start(row) for row in range(merged[0], merged[1])):
                continue  # several tokens a row over a past: only where every row is a fresh prompt
            if saved > gain and all(start(row) + merged[2] <= max_seq for row in range(merged[0], merged[1])):
                best, gain = (i, merged), saved
        if best is None:
            break
        i, merged = best
        calls[i:i + 2] = [{**calls[i], **calls[i + 1]}]
        shape[i:i + 2] = [merged]
    return calls


def _cost(shape: tuple[int, int, int]) -> int:
    lo, hi, S = shape
    return CALL_COST_TOKENS + (hi - lo) * S
