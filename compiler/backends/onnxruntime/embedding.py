"""Row-major embedding lookup once the tied lm_head no longer shares the table.

Pattern: Transpose(Gather(table [H, V], ids, axis=1), perm=[1, 2, 0]), where the [H, V] table is
read by nothing else (the lm_head was quantised and reads its own copy).
Replacement: Gather(table^T [V, H], ids, axis=0): each token reads one contiguous row instead of
H values a vocabulary apart.
Check: refuses when the table has other readers (then it is the lm_head's weight too).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def match(node: ir.Node) -> ir.Node | None:
    """The Transpose after a column Gather, when `node` is such a Gather."""
    if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 1 or node.inputs[0].const_value is None:
        return None
    users = list(node.outputs[0].uses())
    if len(users) == 1 and users[0].node.op_type == "Transpose" and list(users[0].node.attributes.get_ints("perm", [])) == [1, 2, 0]:
        return users[0].node
    return None


def check(gather: ir.Node) -> str | None:
    if len(list(gather.inputs[0].uses())) != 1:
        return "the table is shared with the lm_head"
    return None


def replace(graph: ir.Graph, gather: ir.Node, transpose: ir.Node) -> None:
    table = gather.inputs[0]
    src = table.const_value
    rows = ir.LazyTensor(lambda: ir.Tensor(np.ascontiguousarray(src.numpy().T)), dtype=src.dtype,
                         shape=ir.Shape([src.shape[1], src.shape[0]]), name=f"{table.name}.rows")
    value = ir.Value(name=rows.name, type=ir.TensorType(src.dtype), shape=rows.shape, const_value=rows)
    graph.register_initializer(value)
    lookup = ir.Node("", "Gather", [value, gather.inputs[1]], attributes=[ir.AttrInt64("axis", 0)], name=gather.name)
    lookup.outputs[0].name = f"{gather.name}_rows_output_0"
    lookup.outputs[0].type, lookup.outputs[0].shape = transpose.outputs[0].type, transpose.outputs[0].shape
    graph.insert_before(gather, lookup)
    transpose.outputs[0].replace_all_uses_with(lookup.outputs[0])
    graph.remove([transpose, gather], safe=True)
