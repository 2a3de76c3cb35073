"""numpy reference of kiln::PagedAttention: the cache writes (with their rounding) and the attention.

Rows hold keys and values in `dtype`: float32, float16, bfloat16 (stored as uint16), int8 or
float8_e4m3fn (stored as uint8 codes); int8 and fp8 rows keep a float32 scale per token and head
(amax / 127, amax / 448), rounding half to even as the C kernel does. Only numpy: the runtime's
numpy fallback runs this.
"""

from __future__ import annotations

import numpy as np

# every finite non-negative e4m3fn value, by code 0..126 (127 is NaN; the sign is bit 7)
_E = np.arange(127) >> 3
_M = np.arange(127) & 7
FP8_VALUES = np.where(_E > 0, (1 + _M / 8) * 2.0 ** (_E - 7), _M / 8 * 2.0 ** -6).astype(np.float32)


def fp8_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn codes (uint8): nearest, ties to the even code, saturating at 448."""
    a = np.minimum(np.abs(x), 448.0).astype(np.float32)
    hi = np.clip(np.searchsorted(FP8_VALUES, a), 1, 126)
    lo = hi - 1
    d_lo, d_hi = a - FP8_VALUES[lo], FP8_VALUES[hi] - a
    code = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo).astype(np.uint8)
    return code | np.where(x < 0, 0x80, 0).astype(np.uint8)


def fp8_decode(codes: np.ndarray) -> np.ndarray:
    v = FP8_VALUES[np.minimum(codes & 0x7F, 126)]
    return np.where(codes & 0x80, -v, v).astype(np.float32)


def bf16_encode(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_decode(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """x [..., D] float32 -> (stored values, scale [...] or None)."""
    if dtype == "float32":
        return x.astype(np.float32), None
    if dtype == "float16":
        return x.astype(np.float16), None
    if dtype == "bfloat16":
        return bf16_encode(x), None
    top = 127.0 if dtype == "int8" else 448.0
    amax = np.abs(x).max(-1).astype(np.float32)
    inv = np.where(amax > 0, np.float32(top) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    y = x * inv[..., None]
    stored = np.rint(y).astype(np.int8) if dtype == "int8" else fp8_encode(y)
    return stored, (amax / np.float32(top)).astype(np.float32)


def decode(stored: np.ndarray, scale: np.ndarray | None, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return bf16_decode(stored)
    if dtype == "float8_e4m3fn":
        return fp8_decode(stored) * scale[..., None]
    if dtype == "int8":
        return stored.astype(np.float32) * scale[..., None]
    return stored.astype(np.float32)


def reference(q, k, v, k_rows, v_rows, k_scales, v_scales, positions, num_heads: int, kv_num_heads: int,
              scale: float = 0.0, window: int = 0, dtype: str = "float32", inplace: bool = False) -> np.ndarray:
    """q [B, S, Nq*D], k/v [B, S, Nkv*D]; rows [B, Nkv, M, D], scales [B, Nkv, M(, 1)] or None;
    positions [B, S]. Writes this call's keys and values (into copies unless inplace) and returns
    y [B, S, Nq*D] float32."""
    B, S, _ = q.shape
    M, D = k_rows.shape[2], k_rows.shape[3]
    if not inplace:
        k_rows, v_rows = k_rows.copy(), v_rows.copy()
        k_scales = None if k_scales is None else k_scales.copy()
        v_scales = None if v_scales is None else v_scales.copy()
    ks = None if k_scales is None else k_scales.reshape(B, kv_num_heads, M)
    vs = None if v_scales is None else v_scales.reshape(B, kv_num_heads, M)
    for rows, scales, x in ((k_rows, ks, k), (v_rows, vs, v)):
        x4 = x.reshape(B, S, kv_num_heads, D).astype(np.float32)
        for b in range(B):
            for s in range(S):
                p = int(positions[b, s])
                if 0 <= p < M:
                    stored, sc = encode(x4[b, s], dtype)  # [Nkv, D], [Nkv]
                    rows[b, :, p] = stored
                    if scales is not None:
                        scales[b, :, p] = sc
    keys, values = decode(k_rows, ks, dtype), decode(v_rows, vs, dtype)  # [B, Nkv, M, D]
    g = num_heads // kv_num_heads
    qh = q.reshape(B, S, kv_num_heads, g, D).astype(np.float32) * np.float32(scale or 1.0 / np.sqrt(D))
    logits = np.einsum("bshgd,bhmd->bhgsm", qh, keys)  # [B, Nkv, g, S, M]
    p = np.clip(positions, 0, M - 1)[:, None, None, :, None]
    j = np.arange(M)
    visible = (j <= p) & ((j > p - window) if window > 0 else True)
    logits = np.where(visible, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    y = np.einsum("bhgsm,bhmd->bshgd", w, values)  # [B, S, Nkv, g, D]
    return y.reshape(B, S, num_heads * D).astype(np.float32)
