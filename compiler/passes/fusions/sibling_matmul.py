"""Sibling-MatMul merge: projections that read the same activation become one MatMul + Split.

Pattern: MatMul nodes of one layer whose roles (`kiln.role`, compiler/ir/meta.py) are
`<scope>.<leaf>` for each leaf of a group (q/k/v, gate/up), all reading one activation X [.., K]
with constant weights W_i [K, N_i], each optionally followed by `Add` of a constant bias [N_i].
Replacement: one MatMul with the weights concatenated along N (lazily: the checkpoint is read
at save time), the biases concatenated likewise, and a Split back into the N_i pieces; they
carry the layer and the role `<scope>.<merged leaf>` (what tensor_parallel's ShardSpecs name).
Check: refuses (and says why) when a weight is not constant, K or dtypes differ, or only some
of the projections carry a bias.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler.ir import meta
from compiler.passes.base import Pass, PassResult


@dataclass
class _Proj:
    matmul: ir.Node
    weight: ir.Value
    bias_add: ir.Node | None
    bias: ir.Value | None

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.matmul).outputs[0]


def _bias_of(matmul: ir.Node) -> tuple[ir.Node | None, ir.Value | None]:
    users = list(matmul.outputs[0].uses())
    if len(users) == 1 and users[0].node.op_type == "Add":
        add = users[0].node
        other = add.inputs[1 - users[0].idx]
        if other is not None and other.const_value is not None and len(other.shape) == 1:
            return add, other
    return None, None


def _concat_lazy(values: list[ir.Value], axis: int, name: str) -> ir.Value:
    tensors = [v.const_value for v in values]
    shape = list(tensors[0].shape)
    shape[axis] = sum(t.shape[axis] for t in tensors)

    def read() -> ir.Tensor:  # each part read and copied in turn: one part and the result in memory
        out, at = None, 0
        for t in tensors:
            part = t.numpy()
            if out is None:
                out = np.empty(shape, dtype=part.dtype)
            index = [slice(None)] * len(shape)
            index[axis] = slice(at, at + part.shape[axis])
            out[tuple(index)] = part
            at += part.shape[axis]
        return ir.Tensor(out)

    lazy = ir.LazyTensor(read, dtype=tensors[0].dtype, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, type=ir.TensorType(lazy.dtype), shape=ir.Shape(shape), const_value=lazy)


def _scope_name(node: ir.Node) -> str:
    """For people (notes, the merged nodes' names): the node's name up to its leaf, "/layers.3/attn"."""
    leaf = meta.split_role(meta.role_of(node))[1]
    head, found, _ = (node.name or "").rpartition(f"/{leaf}/")
    return head if found else node.name or ""


class SiblingMatMulMerge(Pass):
    """Merge sibling projections that read the same input into one MatMul (then Split)."""

    def __init__(self, name: str, leaves: tuple[str, ...], merged_leaf: str):
        self.name, self.leaves, self.merged_leaf = name, leaves, merged_leaf

    def describe(self) -> str:
        return f"merge the sibling projections {', '.join(self.leaves)} of each layer into one {self.merged_leaf} MatMul"

    def _groups(self, graph: ir.Graph) -> dict[tuple[int | None, str, int], dict[str, ir.Node]]:
        """(layer, enclosing role, id of X) -> leaf -> MatMul."""
        groups: dict[tuple[int | None, str, int], dict[str, ir.Node]] = defaultdict(dict)
        for node in graph:
            parent, leaf = meta.split_role(meta.role_of(node))
            if node.op_type == "MatMul" and leaf in self.leaves:
                groups[(meta.layer_of(node), parent, id(node.inputs[0]))][leaf] = node
        return groups

    def check(self, projs: list[_Proj]) -> str | None:
        """None when the merge is valid, else the reason it is refused."""
        if any(p.weight.const_value is None for p in projs):
            return "a weight is not a constant"
        if len({(p.weight.shape[0], p.weight.dtype) for p in projs}) != 1 or any(len(p.weight.shape) != 2 for p in projs):
            return "weights differ in input size or dtype"
        if len({p.bias is None for p in projs}) != 1:
            return "only some projections have a bias"
        return None

    def run(self, model: ir.Model) -> PassResult:
        graph, notes, changed = model.graph, [], False
        for (_, parent, _), found in self._groups(graph).items():
            scope = _scope_name(next(iter(found.values())))
            if set(found) != set(self.leaves):
                notes.append(f"{scope}: refused, found only {sorted(found)} of {list(self.leaves)}")
                continue
            projs = [_Proj(found[leaf], found[leaf].inputs[1], *_bias_of(found[leaf])) for leaf in self.leaves]
            reason = self.check(projs)
            if reason:
                notes.append(f"{scope}: refused, {reason}")
                continue
            self._replace(graph, scope, parent, projs)
            changed = True
        return PassResult(model, changed, notes)

    def _replace(self, graph: ir.Graph, scope: str, parent: str, projs: list[_Proj]) -> None:
        prefix = f"{scope}/{self.merged_leaf}"
        weight = _concat_lazy([p.weight for p in projs], 1, f"{prefix}.weight".lstrip("/").replace("/", "."))
        weight.metadata_props["kiln.merged_from"] = ",".join(p.weight.name for p in projs)
        graph.register_initializer(weight)
        x = projs[0].matmul.inputs[0]
        nodes = [ir.Node("", "MatMul", [x, weight], name=f"{prefix}/MatMul")]
        y = nodes[-1].outputs[0]
        if projs[0].bias is not None:
            bias = _concat_lazy([p.bias for p in projs], 0, f"{prefix}.bias".lstrip("/").replace("/", "."))
            graph.register_initializer(bias)
            nodes.append(ir.Node("", "Add", [y, bias], name=f"{prefix}/Add"))
            y = nodes[-1].outputs[0]
        sizes = ir.Value(name=f"{prefix}/split_sizes", const_value=ir.Tensor(np.array([p.weight.shape[1] for p in projs], dtype=np.int64)))
        sizes.type, sizes.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([len(projs)])
        graph.register_initializer(sizes)
        nodes.append(ir.Node("", "Split", [y, sizes], attributes=[ir.AttrInt64("axis", -1)], num_outputs=len(projs), name=f"{prefix}/Split"))
        for n in nodes:
            for i, out in enumerate(n.outputs):
                out.name = f"{n.name}_output_{i}"
        meta.copy_meta(projs[0].matmul, *nodes, role=f"{parent}.{self.merged_leaf}" if parent else self.merged_leaf)
        graph.insert_before(projs[0].matmul, nodes)
        for p, piece in zip(projs, nodes[-1].outputs):
            p.output.replace_all_uses_with(piece)
        for p in projs:
            graph.remove([n for n in (p.bias_add, p.matmul) if n is not None], safe=True)


def merge_qkv() -> SiblingMatMulMerge:
    return SiblingMatMulMerge("merge_qkv", ("q_proj", "k_proj", "v_proj"), "qkv_proj")


def merge_gate_up() -> SiblingMatMulMerge:
    return SiblingMatMulMerge("merge_gate_up", ("gate_proj", "up_proj"), "gate_up_proj")
