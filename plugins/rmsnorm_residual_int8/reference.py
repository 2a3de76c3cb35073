"""numpy reference of kiln::RmsNormResidualInt8: the rmsnorm_residual reference, then
QuantizeLinear's rounding (half to even) and saturation."""

from __future__ import annotations

import numpy as np

from plugins.rmsnorm_residual.reference import reference as rmsnorm_residual


def reference(x, residual, weight, scale, epsilon: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    y, s = rmsnorm_residual(x, residual, weight, epsilon)
    q = np.rint(y.astype(np.float32) / np.float32(scale))  # numpy rounds half to even
    return np.clip(q, -128, 127).astype(np.int8), s
