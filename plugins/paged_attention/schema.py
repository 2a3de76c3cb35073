"""kiln::PagedAttention: write this call's keys and values into the KV rows, then attend over them.

Inputs: q [B, S, Nq*D] (rotated), k [B, S, Nkv*D] (rotated), v [B, S, Nkv*D], past_k / past_v
[B, Nkv, M, D] (the rows: float32, float16, bfloat16, or int8 / uint8 e4m3fn codes with a scale),
position_ids [B, S] int64 (where each token's key goes, and which keys its query sees: j <= p,
and j > p - window with a window), past_k_scale / past_v_scale [B, Nkv, M, 1] float32 (only for
int8 and fp8 rows: a scale per token and head, amax / 127 or amax / 448).
Outputs: y [B, S, Nq*D]; present_k / present_v (and their scales): the rows, updated in place
(the runtime binds past and present to one buffer, as for TensorScatter).
Attributes: num_heads, kv_num_heads (Nq a multiple of Nkv), scale (0 = 1 / sqrt(D)), window
(0 = none), kv_dtype (float32 | float16 | bfloat16 | int8 | float8_e4m3fn).

Why it exists: the graph's attention is the one hot spot kiln's engine core owns the memory of
(docs/decisions/cpu-kernels.md). On ONNX Runtime CPU the engine is cut at these nodes and kiln's
compiled kernel (cpu_kernel.c) runs between the parts, reading the rows in place; int8 / fp8 rows
(4x / 4x fewer bytes a token than float32) exist only on that path.
"""

from __future__ import annotations

import onnx

from compiler.runtime.kv_memory import SCALED
from plugins.spec import Attr, Port

OP_TYPE = "PagedAttention"
INPUTS = (Port("q", "[B, S, Nq*D]"), Port("k", "[B, S, Nkv*D]"), Port("v", "[B, S, Nkv*D]"),
          Port("past_k", "[B, Nkv, M, D]"), Port("past_v", "[B, Nkv, M, D]"), Port("position_ids", "[B, S] int64"))
OUTPUTS = (Port("y", "[B, S, Nq*D]"), Port("present_k", "[B, Nkv, M, D]"), Port("present_v", "[B, Nkv, M, D]"))
# int8 / fp8 rows: two more inputs and outputs, which only the kernel reads (the decomposition is float32's)
SCALE_INPUTS = (Port("past_k_scale", "[B, Nkv, M, 1] float32"), Port("past_v_scale", "[B, Nkv, M, 1] float32"))
SCALE_OUTPUTS = (Port("present_k_scale", "[B, Nkv, M, 1]"), Port("present_v_scale", "[B, Nkv, M, 1]"))
ATTRS = (Attr("num_heads", "int", 1, "query heads Nq"), Attr("kv_num_heads", "int", 1, "key/value heads Nkv"),
         Attr("scale", "float", 0.0, "0 = 1 / sqrt(D)"), Attr("window", "int", 0, "0 = attend to every earlier key"),
         Attr("kv_dtype", "string", "float32", "what the rows hold"))
KV_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16,
             "int8": onnx.TensorProto.INT8, "float8_e4m3fn": onnx.TensorProto.UINT8}


def infer(dtypes: list, shapes: list, attrs: dict) -> list[tuple]:
    q, k, v, past_k, past_v, pos = shapes[:6]
    nq, nkv, kv_dtype = attrs["num_heads"], attrs["kv_num_heads"], attrs["kv_dtype"]
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"PagedAttention: kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    if nkv < 1 or nq % nkv:
        raise ValueError(f"PagedAttention: query heads ({nq}) must be a multiple of KV heads ({nkv})")
    if len(q) != 3 or len(k) != 3 or len(v) != 3 or len(past_k) != 4 or len(past_v) != 4:
        raise ValueError(f"PagedAttention: q, k, v must be [B, S, N*D] and the rows [B, Nkv, M, D], got {q}, {k}, {past_k}")
    if dtypes[3] != KV_DTYPES[kv_dtype] or dtypes[4] != KV_DTYPES[kv_dtype]:
        raise ValueError(f"PagedAttention: rows of kv_dtype {kv_dtype} must be {onnx.TensorProto.DataType.Name(KV_DTYPES[kv_dtype])}")
    if dtypes[5] != onnx.TensorProto.INT64 or len(pos) != 2:
        raise ValueError(f"PagedAttention: position_ids must be [B, S] int64, got {pos}")
    scaled = kv_dtype in SCALED
    if scaled != (len(shapes) == 8):
        raise ValueError(f"PagedAttention: rows of {kv_dtype} {'need' if scaled else 'take no'} past_k_scale and past_v_scale")
    out = [(dtypes[0], list(q)), (dtypes[3], list(past_k)), (dtypes[4], list(past_v))]
    return out + [(onnx.TensorProto.FLOAT, list(shapes[6])), (onnx.TensorProto.FLOAT, list(shapes[7]))] if scaled else out
