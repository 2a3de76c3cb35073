"""The smallest Session (compiler/runtime/session_api.py): a model whose next token is a hash of
everything in its KV row, so any KV the engine core gets wrong (a row overwritten by a dummy, a
prefix copied to the wrong place, a rejected proposal read back) changes the output.

The cache is one layer whose keys hold the token ids fed at each position and whose values mark
the positions written; `reference(tokens, n)` is the same model run on the plain token list,
with no cache and no engine core in sight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compiler.runtime.config import Capabilities, EngineConfig, GenerationDefaults, KVCacheSpec
from compiler.runtime.kv_memory import PagedArray
from compiler.runtime.session_api import last_column

VOCAB, EOS = 50, 0
HEAD_DIM = 16  # a KV block (one page of one head) is 64 tokens


def scores(history: np.ndarray) -> np.ndarray:
    """Logits [VOCAB] after a token history: pseudo-random, fixed by every token of it."""
    seed = int.from_bytes(hashlib.blake2b(np.asarray(history, np.int64).tobytes(), digest_size=8).digest(), "little")
    logits = np.random.default_rng(seed).normal(size=VOCAB).astype(np.float32)
    logits[EOS] -= 3.0  # rarely ends
    return logits


def reference(tokens: list[int], n: int) -> list[int]:
    """Greedy tokens after `tokens`, up to n or EOS, straight from the model."""
    seq, out = list(tokens), []
    for _ in range(n):
        tok = int(scores(np.asarray(seq)).argmax())
        if tok == EOS:
            break
        out.append(tok)
        seq.append(tok)
    return out


@dataclass
class FakeCache:
    batch: int
    arrays: list[np.ndarray]  # keys (token ids in [..., 0]), values (1 where written): [rows, 1, max_seq, HEAD_DIM]
    paged: list[PagedArray] = field(default_factory=list)


class FakeSession:
    def __init__(self, cfg: EngineConfig):
        self.cfg, self.capabilities, self.threads = cfg, cfg.capabilities, 1

    def new_cache(self, rows: int) -> FakeCache:
        paged = [PagedArray((rows, 1, self.cfg.max_seq, HEAD_DIM), np.float32) for _ in range(2)]
        return FakeCache(rows, [p.array for p in paged], paged)

    def cache_rows(self, cache: FakeCache, lo: int, hi: int) -> FakeCache:
        return FakeCache(hi - lo, [a[lo:hi] for a in cache.arrays])

    def binding(self, cache: FakeCache) -> FakeCache:
        return cache

    def step(self, binding: FakeCache, input_ids, position_ids, logits_positions=None, sampling=None) -> np.ndarray:
        if sampling is not None:
            raise ValueError("the fake session does not sample")
        keys, written = binding.arrays
        B, S = input_ids.shape
        if B > binding.batch:
            raise ValueError(f"{B} rows fed to a binding of {binding.batch}")
        if S > 1 and B > 1 and not self.capabilities.multi_token_rows and position_ids[:, 0].any():
            raise ValueError("batch_size must be 1 when sequence_length > 1 and past context is given")
        for b in range(B):
            keys[b, 0, position_ids[b], 0] = input_ids[b]
            written[b, 0, position_ids[b], 0] = 1
        at = last_column(input_ids, logits_positions)
        out = np.zeros((B, at.shape[1], VOCAB), np.float32)
        for b in range(B):
            for k, col in enumerate(at[b]):
                end = int(position_ids[b, col]) + 1
                if not written[b, 0, :end, 0].all():
                    raise AssertionError(f"row {b} reads positions never written below {end}")
                out[b, k] = scores(keys[b, 0, :end, 0].astype(np.int64))
        return out

    def release_row(self, cache: FakeCache, row: int) -> None:
        for p in cache.paged:
            p.release(row)

    def kv_arrays(self, cache: FakeCache) -> list[np.ndarray]:
        return cache.arrays


class FakeText:
    """A word a token: a prompt's words hash to ids 1..VOCAB-1; an id decodes to " t<id>"."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids)

    def prompt_ids(self, prompt: str, chat: bool = False) -> list[int]:
        return [1 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little") % (VOCAB - 1)
                for w in prompt.split()]


class FakeEngine:
    """What the engine core reads of an Engine: config, session, text, path."""

    def __init__(self, max_seq: int = 256, max_batch: int = 4, **capabilities):
        kv = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=HEAD_DIM, max_seq=max_seq)
        self.config = EngineConfig(backend="fake", model_file="fake", inputs=[], outputs=[], kv_cache=kv,
                                   max_batch=max_batch, max_seq=max_seq, vocab_size=VOCAB,
                                   generation=GenerationDefaults(eos_token_ids=[EOS]),
                                   capabilities=Capabilities(**capabilities))
        self.session, self.text, self.path = FakeSession(self.config), FakeText(), Path("fake")
