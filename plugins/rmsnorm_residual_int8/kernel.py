"""Triton kernel of kiln::RmsNormResidualInt8: rmsnorm_residual's kernel with its int8 output
(QUANT: round half to even, saturate), taking the op's inputs in their order."""

from __future__ import annotations

from plugins.rmsnorm_residual.kernel import kernel as rmsnorm_residual


def kernel(x, residual, weight, scale, epsilon: float = 1e-5):
    return rmsnorm_residual(x, residual, weight, epsilon=epsilon, scale=scale)
