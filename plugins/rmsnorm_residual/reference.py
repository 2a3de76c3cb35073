"""numpy reference of kiln::RmsNormResidual: statistics in fp32, outputs in the input dtype."""

from __future__ import annotations

import numpy as np


def reference(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, epsilon: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    s = x.astype(np.float32) + residual.astype(np.float32)  # [..., H]
    inv = 1.0 / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + np.float32(epsilon))  # [..., 1]
    y = s * inv * weight.astype(np.float32)
    return y.astype(x.dtype), s.astype(x.dtype)
