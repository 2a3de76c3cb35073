"""numpy reference of kiln::KvAttention (fp32 softmax, outputs in q's dtype)."""

from __future__ import annotations

import numpy as np


def reference(q, k_cache, v_cache, positions, lengths, scale: float = 0.0, window: int = 0) -> tuple[np.ndarray]:
    B, Nq, S, D = q.shape
    Nkv, M = k_cache.shape[1], k_cache.shape[2]
    group = Nq // Nkv
    k = np.repeat(k_cache.astype(np.float32), group, axis=1)  # [B, Nq, M, D]
    v = np.repeat(v_cache.astype(np.float32), group, axis=1)
    s = np.float32(scale) if scale > 0 else np.float32(1.0 / np.sqrt(D))
    logits = np.einsum("bhsd,bhmd->bhsm", q.astype(np.float32) * s, k)  # [B, Nq, S, M]
    j = np.arange(M)[None, None, :]
    p = positions[:, :, None]
    visible = (j <= p) & (j < lengths[:, None, None])
    if window > 0:
        visible &= j > p - window
    logits = np.where(visible[:, None], logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(-1, keepdims=True)
    return (np.einsum("bhsm,bhmd->bhsd", w, v).astype(q.dtype),)
