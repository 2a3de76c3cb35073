"""Residual Add + RMSNormalization -> com.microsoft.SkipSimplifiedLayerNormalization.

Pattern: s = Add(a, b); y = RMSNormalization(s, w) on the last axis; s is also read elsewhere
(the next residual) or is dropped.
Replacement: SkipSimplifiedLayerNormalization(a, b, w) -> (y, _, _, s): one pass over memory
instead of three kernels.
Check: refuses when the norm is not over the last axis, when its scale is not a constant
vector, or when the Add broadcasts (its inputs differ in shape).
"""

from __future__ import annotations

import onnx_ir as ir

_DOMAIN = "com.microsoft"


def match(node: ir.Node) -> ir.Node | None:
    """The residual Add feeding `node`, when node is an RMSNormalization."""
    if node.op_type != "RMSNormalization":
        return None
    add = node.inputs[0].producer()
    return add if add is not None and add.op_type == "Add" else None


def check(norm: ir.Node, add: ir.Node) -> str | None:
    if norm.attributes.get_int("axis", -1) != -1:
        return "normalisation is not over the last axis"
    if norm.inputs[1].const_value is None or len(norm.inputs[1].shape) != 1:
        return "scale is not a constant vector"
    a, b = add.inputs
    if a.shape is None or b.shape is None or a.shape != b.shape:
        return "the residual Add broadcasts or has unknown shapes"
    return None


def replace(graph: ir.Graph, norm: ir.Node, add: ir.Node) -> None:
    name = norm.name.rsplit("/", 1)[0] + "/SkipSimplifiedLayerNormalization"
    eps = norm.attributes.get_float("epsilon", 1e-5)
    fused = ir.Node(_DOMAIN, "SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], norm.inputs[1]],
                    attributes=[ir.AttrFloat32("epsilon", eps)], num_outputs=4, name=name)
    for i, out in enumerate(fused.outputs):
        out.name = f"{name}_output_{i}"
    for new, old in ((fused.outputs[0], norm.outputs[0]), (fused.outputs[3], add.outputs[0])):
        new.type, new.shape = old.type, old.shape
    graph.insert_before(add, fused)
    norm.outputs[0].replace_all_uses_with(fused.outputs[0])
    add.outputs[0].replace_all_uses_with(fused.outputs[3])
    graph.remove([norm, add], safe=True)
