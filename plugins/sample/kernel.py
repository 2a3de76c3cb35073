"""Triton kernel of kiln::Sample: one program per row, the whole row in one block (BLOCK = next
power of two >= V). The descending sort with ties by lower id is one tl.sort of int64 keys:
the float's order-preserving bits in the high word, BLOCK - 1 - id in the low word. Rows of a
real vocabulary (V = 49152 -> BLOCK 65536) are sorted in one program: correct, not yet the
fast multi-pass version (GPU timings are still to be taken)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sample(logits_ptr, temp_ptr, topk_ptr, topp_ptr, draw_ptr, out_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    ids = tl.arange(0, BLOCK)
    valid = ids < V
    x = tl.load(logits_ptr + row * V + ids, mask=valid, other=float("-inf")).to(tl.float32)
    greedy = tl.argmax(x, axis=0, tie_break_left=True)
    temp = tl.load(temp_ptr + row).to(tl.float32)
    z = x / tl.where(temp > 0, temp, 1.0)
    bits = z.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of the floats
    key = (ordered.to(tl.int64) << 32) | (BLOCK - 1 - ids).to(tl.int64)
    key = tl.sort(key, descending=True)
    low = (key & 0xFFFFFFFF).to(tl.int32)
    order = BLOCK - 1 - low  # ids, sorted
    hi = (key >> 32).to(tl.int32)
    s = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)  # sorted values
    first = tl.max(tl.where(ids == 0, s, float("-inf")), axis=0)
    k = tl.load(topk_ptr + row)
    k = tl.where(k > 0, tl.minimum(k, V), V)
    inside = (ids < k) & valid
    e = tl.where(inside, tl.exp(s - first), 0.0)
    c = tl.cumsum(e, axis=0)
    total = tl.max(tl.where(ids == BLOCK - 1, c, float("-inf")), axis=0)
    p = e / total
    cp = tl.cumsum(p, axis=0)
    top_p = tl.load(topp_ptr + row).to(tl.float32)
    w = tl.where((cp - p) < top_p, p, 0.0)
    cw = tl.cumsum(w, axis=0)
    wt = tl.max(tl.where(ids == BLOCK - 1, cw, float("-inf")), axis=0)
    draw = tl.load(draw_ptr + row).to(tl.float32)
    idx = tl.sum((cw <= draw * wt).to(tl.int64), axis=0)
    idx = tl.minimum(idx, tl.sum((w > 0).to(tl.int64), axis=0) - 1)
    token = tl.sum(tl.where(ids == idx, order, 0).to(tl.int64), axis=0)
    tl.store(out_ptr + row, tl.where(temp > 0, token, greedy.to(tl.int64)))


def kernel(logits, temperature, top_k, top_p, draws):
    """torch tensors on one device -> (tokens [B] int64,)."""
    import torch

    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    _sample[(B,)](logits.contiguous(), temperature.contiguous(), top_k.contiguous(), top_p.contiguous(), draws.contiguous(),
                  out, V, BLOCK=triton.next_power_of_2(V))
    return (out,)
