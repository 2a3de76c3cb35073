"""numpy reference of kiln::Sample (fp32; every step mirrors the decomposition's op order)."""

from __future__ import annotations

import numpy as np


def reference(logits, temperature, top_k, top_p, draws) -> tuple[np.ndarray]:
    z = logits.astype(np.float32)
    B, V = z.shape
    greedy = np.argmax(z, axis=-1)  # first maximum
    pos = temperature > 0
    t = np.where(pos, temperature, np.float32(1)).astype(np.float32)
    z = z / t[:, None]
    order = np.argsort(-z, axis=-1, kind="stable")  # descending, ties by lower id
    s = np.take_along_axis(z, order, -1)  # [B, V]
    k = np.where(top_k > 0, np.minimum(top_k, V), V)
    inside = (np.arange(V)[None, :] < k[:, None]).astype(np.float32)
    e = np.exp(s - s[:, :1]) * inside
    c = np.cumsum(e, axis=-1, dtype=np.float32)
    p = e / c[:, -1:]
    cp = np.cumsum(p, axis=-1, dtype=np.float32)
    keep = ((cp - p) < top_p[:, None].astype(np.float32)).astype(np.float32)
    w = p * keep
    cw = np.cumsum(w, axis=-1, dtype=np.float32)
    idx = (cw <= draws[:, None].astype(np.float32) * cw[:, -1:]).sum(-1)
    idx = np.minimum(idx, (w > 0).sum(-1) - 1)
    token = np.take_along_axis(order, idx[:, None], -1)[:, 0]
    return (np.where(pos, token, greedy).astype(np.int64),)
