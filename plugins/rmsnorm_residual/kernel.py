"""Triton kernel of kiln::RmsNormResidual: one program per row, one read of x and residual and
one write of y and sum (the decomposition reads the sum back for the norm). Rows of up to
BLOCK = next power of two >= H elements; statistics in fp32."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rmsnorm_residual(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    base = row * H
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    s = x + r
    tl.store(s_ptr + base + cols, s.to(s_ptr.dtype.element_ty), mask=mask)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + base + cols, (s * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


def kernel(x, residual, weight, epsilon: float = 1e-5):
    """x, residual [..., H], weight [H] (torch, contiguous, one device) -> (y, sum)."""
    import torch

    H = x.shape[-1]
    x2, r2 = x.contiguous().view(-1, H), residual.contiguous().view(-1, H)
    y, s = torch.empty_like(x2), torch.empty_like(x2)
    _rmsnorm_residual[(x2.shape[0],)](x2, r2, weight.contiguous(), y, s, H, float(epsilon), BLOCK=triton.next_power_of_2(H))
    return y.view(x.shape), s.view(x.shape)
