"""The KV cache as a pool of rows: one row per running sequence.

An engine's cache is [rows, kv_heads, max_seq, head_dim] per layer, and each row is contiguous,
so a step can bind just the rows it needs: a decode step binds rows [0, hi) (the lowest rows are
handed out first, so running sequences cluster there) and a prefill chunk binds its one row. A
session that cannot bind part of its cache (CUDA, TensorRT, multi-rank) binds every row each
step; rows without work in a bound range are fed a harmless dummy token (see `ModelRunner`).
Host rows are reserved address space, committed page by page as they are written and handed
back on release (`runtime/kv_memory.py`), so many rows cost only what their sequences hold.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from compiler.runtime.kv_memory import bytes_per_token

_MAX_BINDINGS = 64  # distinct row ranges kept bound (an IO binding per range)
DEFAULT_ROWS = 64  # host KV rows when max_num_seqs is not set


def row_count(cfg, sliceable: bool, max_num_seqs: int | None, kv_cache_gib: float | None) -> int:
    """Rows for an engine core: max_num_seqs (default DEFAULT_ROWS for host rows, which cost only
    what they hold; for engines that bind every row at once, their max_batch and at most that).
    Device rows are allocated whole, so a KV budget caps their number."""
    if sliceable:
        return max_num_seqs or max(cfg.max_batch, DEFAULT_ROWS)
    rows = min(max_num_seqs or cfg.max_batch, cfg.max_batch)
    kv = cfg.kv_cache
    if kv_cache_gib is not None and kv is not None:
        row_bytes = kv.max_seq * bytes_per_token(kv)
        fit = int(kv_cache_gib * 2**30 // row_bytes)
        if fit < 1:
            raise ValueError(f"a KV budget of {kv_cache_gib} GiB holds no sequence of max_seq {kv.max_seq} "
                             f"({row_bytes / 2**30:.3f} GiB each); raise it")
        rows = min(rows, fit)
    return rows


class RowPool:
    def __init__(self, session, rows: int):
        self.session, self.rows = session, rows
        self.cache = session.new_cache(rows)
        self.sliceable = session.capabilities.sliceable
        self._free = list(range(rows))  # a heap: the lowest free row first
        self._bindings: OrderedDict[tuple[int, int], object] = OrderedDict()

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def release(self, row: int) -> None:
        self.session.release_row(self.cache, row)  # host memory: the row's pages go back to the OS
        heapq.heappush(self._free, row)

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """The row range a call over rows [lo, hi) binds: itself, or every row."""
        return (lo, hi) if self.sliceable else (0, self.rows)

    def binding(self, lo: int, hi: int):
        """An IO binding of rows [lo, hi) (a `span`), kept for reuse."""
        key = (lo, hi)
        io = self._bindings.pop(key, None)
        if io is None:
            cache = self.session.cache_rows(self.cache, lo, hi) if self.sliceable else self.cache
            io = self.session.binding(cache)
            if len(self._bindings) >= _MAX_BINDINGS:
                self._bindings.popitem(last=False)
        self._bindings[key] = io
        return io
