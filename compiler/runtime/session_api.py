"""The one interface every engine session implements, and what the engine core may ask of it.

A session runs an engine's graph over a KV cache it allocates itself. The core never probes a
session for members: it reads `capabilities` (declared by the backend in engine.json, checked
against the session class when the session opens) and calls the six methods below. A new
backend is one file with a class that satisfies `Session`; `tests/runtime/fake_session.py` is
the smallest one.

    cache = session.new_cache(rows)                # every layer [rows, kv_heads, max_seq, head_dim]
    io = session.binding(session.cache_rows(cache, lo, hi))   # sliceable sessions; else the whole cache
    logits = session.step(io, ids, pos, at)        # ids, pos [B, S] int64; at [B, K] -> logits [B, K, V]
    tokens = session.step(io, ids, pos, at, sampling)   # samples: next tokens [B] int64
    session.release_row(cache, row)                # paged: the row's memory goes back
    session.kv_arrays(cache)                       # paged: the host arrays (prefix blocks copy in and out)
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Protocol, runtime_checkable

import numpy as np

from compiler.runtime.config import SAMPLING_INPUT_NAMES, Capabilities, InvalidEngineConfig

SAMPLING_INPUTS = dict(zip(SAMPLING_INPUT_NAMES, (np.float32, np.int64, np.float32, np.float32)))  # name -> dtype


@runtime_checkable
class Session(Protocol):
    capabilities: Capabilities
    threads: int | None  # intra-op threads it runs with (None: not a CPU session); a draft engine shares them

    def new_cache(self, rows: int) -> Any: ...

    def cache_rows(self, cache: Any, lo: int, hi: int) -> Any: ...

    def binding(self, cache: Any) -> Any: ...

    def step(self, binding: Any, input_ids: np.ndarray, position_ids: np.ndarray,
             logits_positions: np.ndarray | None = None, sampling: dict | None = None) -> np.ndarray: ...

    def release_row(self, cache: Any, row: int) -> None: ...

    def kv_arrays(self, cache: Any) -> list[np.ndarray]: ...


def checked(declared: Capabilities, supported: Capabilities, what: str) -> Capabilities:
    """The declared capabilities, refused where they claim what this session class cannot do."""
    can = asdict(supported)
    over = [k for k, v in asdict(declared).items() if v and not can[k]]
    if over:
        raise InvalidEngineConfig(f"engine.json declares {', '.join(over)} but a {what} session cannot do that; "
                                  "rebuild the artifact or restore its engine.json")
    return declared


def last_column(input_ids: np.ndarray, logits_positions: np.ndarray | None) -> np.ndarray:
    """logits_positions, defaulting to the last column of every row: [B, 1]."""
    B, S = input_ids.shape
    return np.full((B, 1), S - 1, dtype=np.int64) if logits_positions is None else logits_positions


def whole_cache(cache: Any, lo: int, hi: int) -> Any:
    """cache_rows of a session that binds every row: only the whole cache is a span."""
    if (lo, hi) != (0, cache.batch):
        raise ValueError(f"this session binds every cache row each call; rows [{lo}, {hi}) of {cache.batch} asked for")
    return cache


def no_sampling(sampling: dict | None) -> None:
    if sampling is not None:
        raise ValueError("this engine does not sample in its graph (capabilities.samples is false)")
