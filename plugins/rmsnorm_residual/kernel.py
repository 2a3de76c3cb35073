"""Triton kernel of kiln::RmsNormResidual (and of RmsNormResidualInt8, QUANT=True): one program
per row, one read of x and residual and one write of y and sum (the decomposition reads the sum
back for the norm). Rows of up to BLOCK = next power of two >= H elements; statistics in fp32;
the int8 output rounds half to even and saturates, as QuantizeLinear does."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(v):
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _rmsnorm_residual(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, scale_ptr, H, eps, BLOCK: tl.constexpr, QUANT: tl.constexpr):
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
    y = (s * inv * w).to(x_ptr.dtype.element_ty)
    if QUANT:
        q = _round_half_even(y.to(tl.float32) / tl.load(scale_ptr).to(tl.float32))
        tl.store(y_ptr + base + cols, tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8), mask=mask)
    else:
        tl.store(y_ptr + base + cols, y, mask=mask)


def kernel(x, residual, weight, epsilon: float = 1e-5, scale=None):
    """x, residual [..., H], weight [H] (torch, contiguous, one device) -> (y, sum); with scale
    (a one-element tensor) y is int8, quantised by it."""
    import torch

    H = x.shape[-1]
    x2, r2 = x.contiguous().view(-1, H), residual.contiguous().view(-1, H)
    y = torch.empty(x2.shape, dtype=torch.int8 if scale is not None else x.dtype, device=x.device)
    s = torch.empty_like(x2)
    _rmsnorm_residual[(x2.shape[0],)](x2, r2, weight.contiguous(), y, s, scale if scale is not None else s, H, float(epsilon),
                                      BLOCK=triton.next_power_of_2(H), QUANT=scale is not None)
    return y.view(x.shape), s.view(x.shape)
