"""Blockwise int4 weight quantisation (the grid shared by int4-rtn and int4-awq).

Weights are MatMul layout W [K, N]; blocks of `group` consecutive input channels (rows) share a
scale, so scales are [ceil(K/group), N], as DequantizeLinear(axis=0, block_size=group) takes them.
When group does not divide K (SmolLM2's K=576 at group 128) the last block is partial.

symmetric: signed int4 in [-8, 7], no zero point. The scale carries the sign of the block's
  largest-magnitude value so that value maps to -8 exactly: the full 16 levels are used.
asymmetric: unsigned int4 in [0, 15] with a per-block zero point (uint4), min..max mapped.
`clip` [K/group, N] shrinks each block's range (AWQ's clipping search picks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class QuantizedWeight:
    q: np.ndarray  # [K, N] int8 holding int4 values (signed) or uint8 holding uint4
    scale: np.ndarray  # [K/group, N] float32
    zero_point: np.ndarray | None  # [K/group, N] uint8 (uint4 values), asymmetric only
    group: int

    def dequantize(self) -> np.ndarray:
        """[K, N] float32."""
        K = self.q.shape[0]
        q = self.q.astype(np.float32)
        if self.zero_point is not None:
            q = q - np.repeat(self.zero_point.astype(np.float32), self.group, axis=0)[:K]
        return q * np.repeat(self.scale, self.group, axis=0)[:K]


def _blocks(w: np.ndarray, group: int) -> np.ndarray:
    """[K, N] -> [ceil(K/group), group, N]; a partial last block is padded with zeros."""
    K, N = w.shape
    pad = -K % group
    if pad:
        w = np.concatenate([w, np.zeros((pad, N), dtype=w.dtype)])
    return w.reshape(-1, group, N)


COLUMNS = 8192  # output columns quantised at a time: a large lm_head's temporaries stay small


def quantize(w: np.ndarray, group: int, symmetric: bool = True, clip: np.ndarray | None = None) -> QuantizedWeight:
    if w.shape[1] > COLUMNS:  # blocks run along K: column slices quantise independently
        parts = [quantize(w[:, c:c + COLUMNS], group, symmetric, None if clip is None else clip[:, c:c + COLUMNS])
                 for c in range(0, w.shape[1], COLUMNS)]
        zp = None if symmetric else np.concatenate([p.zero_point for p in parts], axis=1)
        return QuantizedWeight(np.concatenate([p.q for p in parts], axis=1),
                               np.concatenate([p.scale for p in parts], axis=1), zp, group)
    wb = _blocks(np.asarray(w, dtype=np.float32), group)  # [G, g, N]
    ratio = 1.0 if clip is None else clip[:, None, :]
    if symmetric:
        hi, lo = wb.max(axis=1, keepdims=True), wb.min(axis=1, keepdims=True)  # [G, 1, N]
        extreme = np.where(hi >= -lo, hi, lo) * ratio  # the signed value of largest magnitude
        scale = extreme / -8.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.rint(wb / scale), -8, 7).astype(np.int8)
        return QuantizedWeight(q.reshape(-1, w.shape[1])[: w.shape[0]], scale[:, 0, :], None, group)
    lo, hi = wb.min(axis=1, keepdims=True) * ratio, wb.max(axis=1, keepdims=True) * ratio
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # zero stays exactly representable
    scale = ((hi - lo) / 15.0).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(wb / scale) + zp, 0, 15).astype(np.uint8)
    return QuantizedWeight(q.reshape(-1, w.shape[1])[: w.shape[0]], scale[:, 0, :], zp[:, 0, :], group)


def fake_quantize(w: np.ndarray, group: int, symmetric: bool = True, clip: np.ndarray | None = None) -> np.ndarray:
    return quantize(w, group, symmetric, clip).dequantize()
