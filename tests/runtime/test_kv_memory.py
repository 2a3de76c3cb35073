"""Host KV rows are address space until written: memory follows what each row holds, a released
row hands its pages back (and reads as zeros), and the block budget counts tokens of every layer."""

from __future__ import annotations

import numpy as np

from compiler.runtime.config import KVCacheSpec
from compiler.runtime.kv_memory import PAGE, KVBlocks, PagedArray, resident_bytes


def test_rows_commit_pages_as_written_and_release_returns_them():
    arr = PagedArray((32, 3, 2048, 64), np.float32)  # 48 MiB reserved
    assert resident_bytes([arr.array]) == 0
    arr.array[:, :, :16] = 1.0  # 16 tokens in every row and head: one page each
    assert resident_bytes([arr.array]) == 32 * 3 * PAGE
    for row in range(32):
        arr.release(row)
    assert resident_bytes([arr.array]) == 0 and not arr.array.any()


def test_block_budget_counts_every_layer_and_refuses_what_never_fits():
    kv = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, max_seq=2048, dtype="float32")
    blocks = KVBlocks.for_cache(kv, 0.5)
    assert blocks.block_tokens == PAGE // 256 and blocks.block_bytes == 2 * 30 * 3 * PAGE
    assert blocks.capacity == int(0.5 * 2**30 // blocks.block_bytes)
    assert blocks.reserve(1, 100) and blocks.used == blocks.blocks_for(100)
    assert not blocks.fits_ever(blocks.capacity * blocks.block_tokens + 1)
    while blocks.reserve(len(blocks.held) + 1, 2000):
        pass
    assert not blocks.reserve(999, 2000) and blocks.free < blocks.blocks_for(2000)
    blocks.release(1)
    assert 1 not in blocks.held
