"""Triton kernel of kiln::KvAttention: one program per (sequence, query head, query), streaming
the visible part of the cache in BLOCK_M blocks with an online softmax (fp32 statistics); keys
past the sequence's length or outside the window are neither read nor weighted."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _kv_attention(q_ptr, k_ptr, v_ptr, pos_ptr, len_ptr, y_ptr, NQ, NKV, S, M, D, scale, window,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    s = row % S
    h = (row // S) % NQ
    b = row // (S * NQ)
    kvh = h // (NQ // NKV)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + ((b * NQ + h) * S + s) * D + d, mask=dm, other=0.0).to(tl.float32) * scale
    p = tl.load(pos_ptr + b * S + s)
    length = tl.load(len_ptr + b)
    hi = tl.minimum(p + 1, length)  # keys [lo, hi) are visible
    lo = tl.where(window > 0, tl.maximum(p - window + 1, 0), 0)
    base = (b * NKV + kvh) * M * D
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        j = start + tl.arange(0, BLOCK_M)
        vis = (j >= lo) & (j < hi)
        kv_off = base + j[:, None] * D + d[None, :]
        kv_mask = vis[:, None] & dm[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.where(vis, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.where(m_new == float("-inf"), 1.0, tl.exp(m_i - m_new))
        w = tl.where(vis, tl.exp(scores - m_new), 0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(w[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(w, axis=0)
        m_i = m_new
    tl.store(y_ptr + ((b * NQ + h) * S + s) * D + d, (acc / l_i).to(y_ptr.dtype.element_ty), mask=dm)


def kernel(q, k_cache, v_cache, positions, lengths, scale: float = 0.0, window: int = 0):
    import torch

    B, NQ, S, D = q.shape
    NKV, M = k_cache.shape[1], k_cache.shape[2]
    y = torch.empty_like(q)
    eff = float(scale) if scale > 0 else float(D) ** -0.5
    _kv_attention[(B * NQ * S,)](q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), positions.contiguous(),
                                lengths.contiguous(), y, NQ, NKV, S, M, D, eff, int(window),
                                BLOCK_M=min(64, triton.next_power_of_2(M)), BLOCK_D=triton.next_power_of_2(D))
    return (y,)
