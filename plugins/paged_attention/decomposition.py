"""kiln::PagedAttention in standard ONNX ops, for float32 rows (what kiln's graph held before the
op): TensorScatter of the new keys and values at position_ids[:, 0], the causal (and window) mask
from the positions, q scaled (1 / sqrt(D) when scale is 0), then Attention-23 on [B, N, S, D]
heads. Quantised rows have no decomposition: only the kernel reads them."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from plugins.spec import ref_attr


def _const(name: str, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _attr_const(name: str, attr: str, kind: str):
    node = helper.make_node("Constant", [], [name])
    a = ref_attr(f"value_{kind}", kind)
    a.ref_attr_name = attr
    node.attribute.append(a)
    return node


def _heads(n, x: str, shape: str, out: str) -> list:
    """x [B, S, N*D] -> out [B, N, S, D]"""
    return [n("Reshape", [x, shape], [f"{out}_bsnd"]), n("Transpose", [f"{out}_bsnd"], [out], perm=[0, 2, 1, 3])]


def decomposition() -> list:
    n = helper.make_node
    return [
        _const("zero_i", np.int64(0)), _const("one_i", np.int64(1)), _const("zero_f", np.float32(0)),
        _const("one_f", np.float32(1)), _const("first", np.array([0], dtype=np.int64)),
        _const("ax_1", np.array([1], dtype=np.int64)), _const("ax_q", np.array([1, 3], dtype=np.int64)),
        _const("zeros2", np.array([0, 0], dtype=np.int64)), _const("minus1", np.array([-1], dtype=np.int64)),
        _attr_const("scale_attr", "scale", "float"), _attr_const("window_attr", "window", "int"),
        _attr_const("kvh", "kv_num_heads", "int"), n("Unsqueeze", ["kvh", "first"], ["kvh1"]),
        n("Concat", ["zeros2", "kvh1", "minus1"], ["kv_shape"], axis=0),  # [0, 0, Nkv, -1]
        _attr_const("qh", "num_heads", "int"), n("Unsqueeze", ["qh", "first"], ["qh1"]),
        n("Concat", ["zeros2", "qh1", "minus1"], ["q_shape"], axis=0),  # [0, 0, Nq, -1]
        _const("merged", np.array([0, 0, -1], dtype=np.int64)),
        *_heads(n, "k", "kv_shape", "k4"), *_heads(n, "v", "kv_shape", "v4"),
        n("Gather", ["position_ids", "first"], ["start2"], axis=1), n("Squeeze", ["start2", "ax_1"], ["write_index"]),
        n("TensorScatter", ["past_k", "k4", "write_index"], ["present_k"], axis=2),
        n("TensorScatter", ["past_v", "v4", "write_index"], ["present_v"], axis=2),
        n("Shape", ["past_k"], ["m1"], start=2, end=3), n("Squeeze", ["m1"], ["m"]),
        n("Range", ["zero_i", "m", "one_i"], ["key_pos"]),  # [M]
        n("Unsqueeze", ["position_ids", "ax_q"], ["qpos"]),  # [B, 1, S, 1]
        n("LessOrEqual", ["key_pos", "qpos"], ["causal"]),  # [B, 1, S, M]
        n("Sub", ["qpos", "window_attr"], ["low"]), n("Greater", ["key_pos", "low"], ["in_window"]),
        n("LessOrEqual", ["window_attr", "zero_i"], ["no_window"]), n("Or", ["in_window", "no_window"], ["windowed"]),
        n("And", ["causal", "windowed"], ["mask"]),
        n("Shape", ["past_k"], ["d1"], start=3, end=4), n("Cast", ["d1"], ["d_f"], to=1), n("Sqrt", ["d_f"], ["sqrt_d"]),
        n("Div", ["one_f", "sqrt_d"], ["default_scale"]), n("Greater", ["scale_attr", "zero_f"], ["has_scale"]),
        n("Where", ["has_scale", "scale_attr", "default_scale"], ["scale_1"]), n("Squeeze", ["scale_1"], ["scale_0"]),
        n("CastLike", ["scale_0", "q"], ["scale_t"]), n("Mul", ["q", "scale_t"], ["q_scaled"]),
        *_heads(n, "q_scaled", "q_shape", "q4"),
        n("Attention", ["q4", "present_k", "present_v", "mask"], ["y4"], scale=1.0),  # [B, Nq, S, D]
        n("Transpose", ["y4"], ["y_bsnd"], perm=[0, 2, 1, 3]), n("Reshape", ["y_bsnd", "merged"], ["y"]),
    ]
