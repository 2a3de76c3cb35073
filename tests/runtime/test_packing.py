"""Call packing: short inputs over neighbouring rows merge into one padded call, long prompt
chunks stay alone, no merge runs a row past max_seq, and engines that cannot take several rows
of several tokens over a past only ever merge one-token rows."""

from __future__ import annotations

from compiler.runtime.packing import CALL_COST_TOKENS, pack


def call(row: int, n: int) -> dict:
    return {row: (None, [0] * n)}


def rows_of(calls: list[dict]) -> list[list[int]]:
    return [sorted(c) for c in calls]


def test_decodes_and_a_short_chunk_merge_a_long_chunk_stays_alone():
    decodes = {0: (None, [1]), 1: (None, [1]), 2: (None, [1])}
    calls = pack([decodes, call(3, 4), call(4, 4 * CALL_COST_TOKENS)], lambda r: 10, 2048)
    assert rows_of(calls) == [[0, 1, 2, 3], [4]]


def test_a_merge_never_pads_a_row_past_max_seq():
    starts = {0: 10, 1: 2046}
    calls = pack([call(0, 4), call(1, 1)], starts.get, 2048)
    assert rows_of(calls) == [[0], [1]]
    assert rows_of(pack([call(0, 2), call(1, 1)], starts.get, 2048)) == [[0, 1]]


def test_without_mixed_batches_only_one_token_rows_or_fresh_prompts_merge():
    starts = {0: 5, 1: 5, 2: 5, 3: 5, 4: 0, 5: 0}
    calls = pack([{0: (None, [1]), 1: (None, [1])}, call(2, 1), call(3, 3), call(4, 20), call(5, 20)], starts.get, 2048,
                 mixed=False)
    assert rows_of(calls) == [[0, 1, 2], [3], [4, 5]]
    assert rows_of(pack([call(0, 3), call(1, 3)], starts.get, 2048, mixed=True)) == [[0, 1]]


def test_far_apart_rows_are_not_merged_through_a_wide_idle_span():
    calls = pack([call(0, 8), call(60, 8)], lambda r: 0, 2048)
    assert rows_of(calls) == [[0], [60]]
