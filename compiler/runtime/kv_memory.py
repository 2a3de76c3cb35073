"""Host KV memory that is paged by the operating system: rows reserved, pages committed on write.

Each layer's cache is one anonymous mapping viewed as [rows, kv_heads, max_seq, head_dim]. The
mapping only reserves address space: a 4 KiB page becomes memory when the engine first writes a
key or value into it, so a sequence costs what it has written (one page holds 4096 / (head_dim *
itemsize) tokens of one head: 16 for fp32 and head_dim 64), not max_seq. Releasing a row hands its
pages back (MADV_DONTNEED; they read as zeros afterwards). The block table of PagedAttention is
the MMU's page table here, and the attention kernels still see contiguous rows, so nothing is
gathered per step (the approach of vAttention, Prabhu et al. 2024, on the CPU's own paging).

`KVBlocks` is the accounting that makes the memory budget hold: a sequence reserves the blocks of
its prompt plus its token limit when it is admitted, and a request that could never fit is
refused at once.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import numpy as np

PAGE = mmap.PAGESIZE
DEFAULT_KV_GIB = 4.0  # the KV budget of host rows when none is set
# how each KV dtype of engine.json is held in numpy (bfloat16 and fp8 as their bits)
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8, "float8_e4m3fn": np.uint8}
SCALED = ("int8", "float8_e4m3fn")  # rows with a float32 scale per token and head beside them


def storage(kv) -> np.dtype:
    """The numpy type of the rows of kv (the engine's KVCacheSpec)."""
    if kv.dtype not in STORAGE:
        raise ValueError(f"KV cache dtype {kv.dtype!r} is not one of {', '.join(STORAGE)}; rebuild the artifact")
    return np.dtype(STORAGE[kv.dtype])


def token_bytes(kv) -> int:
    """Bytes of one token of one head's keys (or values): its values, and its scale if it has one."""
    return kv.head_dim * storage(kv).itemsize + (4 if kv.dtype in SCALED else 0)


def bytes_per_token(kv) -> int:
    """Bytes one token of a sequence takes: its keys and values in every layer and KV head."""
    return 2 * kv.num_layers * kv.num_kv_heads * token_bytes(kv)


class PagedArray:
    """A zero-filled array in its own anonymous mapping; `release(row)` frees a row's pages."""

    def __init__(self, shape: tuple[int, ...], dtype):
        self.dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self._map = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a 2 MiB huge page would commit many rows' tokens at once
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self.array = np.frombuffer(self._map, dtype=self.dtype, count=int(np.prod(shape))).reshape(shape)
        self.row_bytes = nbytes // shape[0] if shape[0] else 0

    def release(self, row: int) -> None:
        """Return the whole pages inside row `row` to the OS (a partial page at either end keeps
        its stale bytes, which no sequence reads before writing)."""
        start, end = row * self.row_bytes, (row + 1) * self.row_bytes
        lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def resident_bytes(arrays: list[np.ndarray]) -> int:
    """Bytes of these mappings that are in memory now (from /proc/self/smaps; 0 if unreadable)."""
    starts = {a.ctypes.data for a in arrays}  # each a whole PagedArray.array (a mapping of its own)
    total, take = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    take = int(head.split("-")[0], 16) in starts
                elif take and head == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


@dataclass
class KVBlocks:
    """Block accounting under a memory budget: a block is `block_tokens` tokens of every layer's
    keys and values (`block_bytes`); `capacity` blocks fit the budget (None: unbounded)."""

    block_tokens: int
    block_bytes: int
    capacity: int | None
    budget_gib: float | None = None
    held: dict[int, int] = field(default_factory=dict)  # request id -> blocks reserved

    @classmethod
    def for_cache(cls, kv, budget_gib: float | None) -> "KVBlocks":
        """kv: the engine's KVCacheConfig. A block is one page of one head's keys (at least one token)."""
        tokens = max(PAGE // (kv.head_dim * storage(kv).itemsize), 1)
        block_bytes = bytes_per_token(kv) * tokens
        capacity = None if budget_gib is None else int(budget_gib * 2**30 // block_bytes)
        return cls(tokens, block_bytes, capacity, budget_gib)

    @classmethod
    def for_budget(cls, kv, budget_gib: float | None) -> "KVBlocks | None":
        """The accounting of an engine core's host rows (None for encoders): the budget, or
        DEFAULT_KV_GIB; a budget that holds no block is refused."""
        if kv is None:
            return None
        blocks = cls.for_cache(kv, budget_gib or DEFAULT_KV_GIB)
        if blocks.capacity < 1:
            raise ValueError(f"a KV budget of {blocks.budget_gib} GiB holds no block of {blocks.block_tokens} tokens "
                             f"({blocks.block_bytes / 2**20:.2f} MiB); raise it")
        return blocks

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_tokens)

    @property
    def used(self) -> int:
        return sum(self.held.values())

    @property
    def free(self) -> int | None:
        return None if self.capacity is None else self.capacity - self.used

    def fits_ever(self, tokens: int) -> bool:
        return self.capacity is None or self.blocks_for(tokens) <= self.capacity

    def reserve(self, request_id: int, tokens: int) -> bool:
        need = self.blocks_for(tokens)
        if self.capacity is not None and self.used + need > self.capacity:
            return False
        self.held[request_id] = need
        return True

    def release(self, request_id: int) -> None:
        self.held.pop(request_id, None)
