"""kiln::Sample in standard ONNX ops (TopK sorts; CumSum, comparisons and GatherElements pick):
the same steps, in the same order, as the reference."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper


def _const(name: str, value) -> object:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def decomposition() -> list:
    n = helper.make_node
    return [
        _const("zero_f", np.float32(0)), _const("one_f", np.float32(1)), _const("zero_i", np.int64(0)),
        _const("one_i", np.int64(1)), _const("last", np.array([-1], dtype=np.int64)),
        _const("start", np.array([0], dtype=np.int64)), _const("axis1", np.array([1], dtype=np.int64)),
        _const("end", np.array([np.iinfo(np.int64).max], dtype=np.int64)),
        n("ArgMax", ["logits"], ["greedy"], axis=-1, keepdims=0, select_last_index=0),
        n("Greater", ["temperature", "zero_f"], ["pos"]),
        n("Where", ["pos", "temperature", "one_f"], ["t"]),
        n("Unsqueeze", ["t", "last"], ["t2"]),
        n("Div", ["logits", "t2"], ["z"]),
        n("Shape", ["logits"], ["vocab1"], start=1, end=2),  # [1]
        n("TopK", ["z", "vocab1"], ["s", "order"], axis=-1, largest=1, sorted=1),
        n("Slice", ["s", "start", "axis1", "last"], ["first"]),  # [B, 1]
        n("Squeeze", ["vocab1"], ["vocab"]),
        n("Range", ["zero_i", "vocab", "one_i"], ["rank"]),  # [V]
        n("Min", ["top_k", "vocab"], ["k_min"]),
        n("Greater", ["top_k", "zero_i"], ["k_set"]),
        n("Where", ["k_set", "k_min", "vocab"], ["k"]),
        n("Unsqueeze", ["k", "last"], ["k2"]),
        n("Less", ["rank", "k2"], ["inside_b"]),
        n("Cast", ["inside_b"], ["inside"], to=1),
        n("Sub", ["s", "first"], ["shifted"]),
        n("Exp", ["shifted"], ["ex"]),
        n("Mul", ["ex", "inside"], ["e"]),
        n("CumSum", ["e", "last"], ["c"]),
        n("Slice", ["c", "last", "end", "last"], ["total"]),
        n("Div", ["e", "total"], ["p"]),
        n("CumSum", ["p", "last"], ["cp"]),
        n("Sub", ["cp", "p"], ["excl"]),
        n("Unsqueeze", ["top_p", "last"], ["top_p2"]),
        n("Less", ["excl", "top_p2"], ["keep_b"]),
        n("Cast", ["keep_b"], ["keep"], to=1),
        n("Mul", ["p", "keep"], ["w"]),
        n("CumSum", ["w", "last"], ["cw"]),
        n("Slice", ["cw", "last", "end", "last"], ["wt"]),
        n("Unsqueeze", ["draws", "last"], ["d2"]),
        n("Mul", ["d2", "wt"], ["thr"]),
        n("LessOrEqual", ["cw", "thr"], ["below_b"]),
        n("Cast", ["below_b"], ["below"], to=7),
        n("ReduceSum", ["below", "last"], ["idx_raw"], keepdims=1),
        n("Greater", ["w", "zero_f"], ["live_b"]),
        n("Cast", ["live_b"], ["live"], to=7),
        n("ReduceSum", ["live", "last"], ["n_live"], keepdims=1),
        n("Sub", ["n_live", "one_i"], ["last_live"]),
        n("Min", ["idx_raw", "last_live"], ["idx"]),
        n("GatherElements", ["order", "idx"], ["token2"], axis=-1),
        n("Squeeze", ["token2", "last"], ["token"]),
        n("Where", ["pos", "token", "greedy"], ["tokens"]),
    ]
