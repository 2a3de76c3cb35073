"""Prefix reuse: KV blocks keyed by the token prefix that produced them.

A prompt is cut into blocks of `block_size` tokens; block i is keyed by a digest chained over
every token up to its end, so a key names the whole prefix, not just the block. Once a sequence
has computed a full block, its keys and values (every layer) are stored in a block pool; a later
prompt that starts with the same tokens copies the longest stored chain into its cache row and
prefills only the rest (a shared system prompt or few-shot header is computed once). The pool
is bounded: the least recently used blocks are evicted when it is full. Blocks are copied into
rows, so a row never aliases the pool and eviction never touches a running sequence.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def block_keys(tokens: list[int], block_size: int, upto: int | None = None) -> list[bytes]:
    """Digests of the full blocks of tokens[:upto], each chained over the whole prefix."""
    n = (len(tokens) if upto is None else upto) // block_size
    keys, h = [], b""
    for i in range(n):
        block = np.asarray(tokens[i * block_size:(i + 1) * block_size], dtype=np.int64).tobytes()
        h = hashlib.blake2b(h + block, digest_size=16).digest()
        keys.append(h)
    return keys


class PrefixCache:
    """Up to `num_blocks` blocks of `block_size` tokens, for caches whose layers are numpy
    arrays [rows, kv_heads, max_seq, head_dim] (keys and values interleaved, as the sessions hold
    them; int8 / fp8 rows add their scales, [rows, kv_heads, max_seq, 1])."""

    def __init__(self, layouts: list[tuple[int, int, np.dtype]], block_size: int, num_blocks: int):
        self.block_size, self.num_blocks = block_size, num_blocks
        # one pool per cache array (kv_heads, head_dim, dtype): [num_blocks, kv_heads, block_size, head_dim]
        self.pools = [np.zeros((num_blocks, h, block_size, d), dtype=dtype) for h, d, dtype in layouts]
        self.index: OrderedDict[bytes, int] = OrderedDict()  # key -> block, least recently used first
        self.free = list(range(num_blocks))
        self.queried_tokens = self.hit_tokens = 0

    def match(self, tokens: list[int]) -> list[int]:
        """Blocks of the longest stored prefix of tokens, leaving at least one token to compute
        (the last prompt token's logits pick the first new token)."""
        keys = []
        for key in block_keys(tokens, self.block_size, len(tokens) - 1):
            if key not in self.index:
                break
            keys.append(key)
        self._touch(keys)
        return [self.index[k] for k in keys]

    def count(self, queried: int, hit: int) -> None:
        """Prefix hit-rate bookkeeping: tokens of prompts looked up, and of them, loaded from blocks."""
        self.queried_tokens += queried
        self.hit_tokens += hit

    def _touch(self, keys: list[bytes]) -> None:
        """Most recently used: a chain's root last, so a prefix outlives its continuations."""
        for key in reversed(keys):
            self.index.move_to_end(key)

    def load(self, blocks: list[int], arrays: list[np.ndarray], row: int, first: int = 0) -> int:
        """Copy blocks[first:] into their positions of a cache row (blocks before `first` are
        there already); returns the tokens the row then holds, len(blocks) * block_size."""
        bs, todo = self.block_size, blocks[first:]
        if todo:
            for pool, arr in zip(self.pools, arrays):
                got = pool[todo]  # [n, H, bs, D]
                arr[row, :, first * bs:len(blocks) * bs] = got.transpose(1, 0, 2, 3).reshape(got.shape[1], -1, got.shape[3])
        return len(blocks) * bs

    def store(self, tokens: list[int], upto: int, arrays: list[np.ndarray], row: int) -> None:
        """Keep the full blocks of tokens[:upto] (already in the row's cache) that are not stored yet."""
        bs = self.block_size
        keys = block_keys(tokens, bs, upto)
        self._touch([k for k in keys if k in self.index])  # before any eviction: this chain stays
        for i, key in enumerate(keys):
            if key in self.index:
                continue
            block = self._take()
            if block is None:
                break
            for pool, arr in zip(self.pools, arrays):
                pool[block] = arr[row, :, i * bs:(i + 1) * bs]
            self.index[key] = block
        self._touch([k for k in keys if k in self.index])

    def _take(self) -> int | None:
        if self.free:
            return self.free.pop()
        if not self.index:
            return None
        _, block = self.index.popitem(last=False)  # evict the least recently used
        return block

    @property
    def used_blocks(self) -> int:
        return len(self.index)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
