"""Token selection from logits: greedy, or temperature / top-k / top-p sampling with a seeded RNG.

Each row draws exactly one uniform number per step from the generator, so a seed reproduces
the same tokens whatever the batch size of the other rows' filters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> token ids [B] int64."""
    if params.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    draws = rng.random(logits.shape[0])
    return np.array([_sample_row(row, params, u) for row, u in zip(logits, draws)], dtype=np.int64)


def _sample_row(row: np.ndarray, p: SamplingParams, u: float) -> int:
    order, probs = _filtered(row, p)
    return int(order[draw_index(probs, u)])


def draw_index(probs: np.ndarray, u: float) -> int:
    """The index a uniform draw u in [0, 1) picks from probabilities probs (inverse CDF)."""
    return min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(probs) - 1)


def distribution(row: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution `sample` draws from for one row of logits [V], over the whole vocabulary
    (zeros outside top-k / top-p); greedy is one-hot on the argmax."""
    probs = np.zeros(row.shape[-1], dtype=np.float64)
    if p.greedy:
        probs[int(row.argmax())] = 1.0
        return probs
    order, kept = _filtered(row, p)
    probs[order] = kept
    return probs


def _filtered(row: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Token ids best first and their probabilities after temperature, top-k and top-p."""
    scaled = row.astype(np.float64) / p.temperature
    order = np.argsort(-scaled, kind="stable")  # [V] best first
    if p.top_k:
        order = order[: p.top_k]
    logits = scaled[order]
    probs = np.exp(logits - logits[0])
    probs /= probs.sum()
    if p.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)  # smallest prefix with mass >= top_p
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    return order, probs
