"""kiln::KvAttention: attention of this call's queries over a static KV cache, with each
sequence's real cache length and an optional sliding window.

Inputs: q [B, Nq, S, D] (rotated), k_cache / v_cache [B, Nkv, M, D] (already holding this
call's keys and values), positions [B, S] int64 (each query's absolute position), lengths [B]
int64 (valid cache entries per sequence). Key j is visible to a query at position p when
j <= p, j < lengths[b] and, with window > 0, j > p - window. Nq must be a multiple of Nkv
(query head h reads KV head h // (Nq / Nkv)). Output [B, Nq, S, D].
Attributes: scale (0 = 1 / sqrt(D)), window (0 = no window).

Why it exists: TensorRT's ONNX parser imports Attention but drops `nonpad_kv_seqlen`, so a
batch of sequences of different lengths attends over padding; and kiln's TensorRT network path
(add_attention_v2) has no sliding window, so Mistral and Gemma 3 with a window shorter than
max_seq are refused there. This op carries both through the parser to a plugin layer.
"""

from __future__ import annotations

import onnx

from plugins.spec import Attr, Port

OP_TYPE = "KvAttention"
INPUTS = (Port("q", "[B, Nq, S, D]"), Port("k_cache", "[B, Nkv, M, D]"), Port("v_cache", "[B, Nkv, M, D]"),
          Port("positions", "[B, S] int64"), Port("lengths", "[B] int64"))
OUTPUTS = (Port("y", "[B, Nq, S, D]"),)
ATTRS = (Attr("scale", "float", 0.0, "0 = 1 / sqrt(D)"), Attr("window", "int", 0, "0 = attend to every earlier key"))


def infer(dtypes: list, shapes: list, attrs: dict) -> list[tuple]:
    q, k, v, pos, lens = shapes
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        raise ValueError(f"KvAttention: q, k_cache and v_cache must be 4-D, got {q}, {k}, {v}")
    nq, nkv = q[1], k[1]
    if isinstance(nq, int) and isinstance(nkv, int) and nq % nkv:
        raise ValueError(f"KvAttention: query heads ({nq}) must be a multiple of KV heads ({nkv})")
    if dtypes[3] != onnx.TensorProto.INT64 or dtypes[4] != onnx.TensorProto.INT64:
        raise ValueError("KvAttention: positions and lengths must be int64")
    if len(pos) != 2 or len(lens) != 1:
        raise ValueError(f"KvAttention: positions must be [B, S] and lengths [B], got {pos}, {lens}")
    return [(dtypes[0], list(q))]
