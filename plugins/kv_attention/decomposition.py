"""kiln::KvAttention in standard ONNX ops: the visibility mask from positions, lengths and the
window, q scaled (1 / sqrt(D) when scale is 0), then Attention-23 (GQA by head count)."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from plugins.spec import ref_attr


def _const(name: str, value) -> object:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _attr_const(name: str, attr: str, kind: str) -> object:
    node = helper.make_node("Constant", [], [name])
    a = ref_attr(f"value_{kind}", kind)
    a.ref_attr_name = attr
    node.attribute.append(a)
    return node


def decomposition() -> list:
    n = helper.make_node
    return [
        _const("zero_i", np.int64(0)), _const("one_i", np.int64(1)), _const("zero_f", np.float32(0)),
        _const("one_f", np.float32(1)), _const("ax_last", np.array([-1], dtype=np.int64)),
        _const("ax_bh", np.array([1, 3], dtype=np.int64)), _const("ax_b", np.array([1, 2, 3], dtype=np.int64)),
        _attr_const("scale_attr", "scale", "float"), _attr_const("window_attr", "window", "int"),
        n("Shape", ["k_cache"], ["m1"], start=2, end=3), n("Squeeze", ["m1"], ["m"]),
        n("Range", ["zero_i", "m", "one_i"], ["key_pos"]),  # [M]
        n("Unsqueeze", ["positions", "ax_bh"], ["qpos"]),  # [B, 1, S, 1]
        n("LessOrEqual", ["key_pos", "qpos"], ["causal"]),  # [B, 1, S, M]
        n("Unsqueeze", ["lengths", "ax_b"], ["lens"]),  # [B, 1, 1, 1]
        n("Less", ["key_pos", "lens"], ["filled"]),
        n("And", ["causal", "filled"], ["seen"]),
        n("Sub", ["qpos", "window_attr"], ["low"]),
        n("Greater", ["key_pos", "low"], ["in_window"]),
        n("LessOrEqual", ["window_attr", "zero_i"], ["no_window"]),
        n("Or", ["in_window", "no_window"], ["windowed"]),
        n("And", ["seen", "windowed"], ["mask"]),
        n("Shape", ["q"], ["d1"], start=3, end=4), n("Cast", ["d1"], ["d_f"], to=1), n("Sqrt", ["d_f"], ["sqrt_d"]),
        n("Div", ["one_f", "sqrt_d"], ["default_scale"]),
        n("Greater", ["scale_attr", "zero_f"], ["has_scale"]),
        n("Where", ["has_scale", "scale_attr", "default_scale"], ["scale_1"]),
        n("Cast", ["scale_1"], ["scale_q"], to=1),
        n("CastLike", ["scale_q", "q"], ["scale_t"]),
        n("Mul", ["q", "scale_t"], ["q_scaled"]),
        n("Attention", ["q_scaled", "k_cache", "v_cache", "mask"], ["y"], scale=1.0),
    ]
