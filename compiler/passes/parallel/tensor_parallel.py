"""tensor_parallel: the graph of one tensor-parallel rank, from the architecture's ShardSpecs.

Pattern: a MatMul in a layer whose role (`kiln.role`, compiler/ir/meta.py) has a ShardSpec and
whose weight is an initializer [K, N].
Replacement, for rank r of tp:
  column  weight[:, cols of r] (a following bias Add is sliced alike); when the product feeds
          a Split (a fused checkpoint projection), each part is sliced on its own and the
          split sizes divided by tp;
  row     weight[rows of r, :], then `kiln::AllReduce(sum)` over the tp group before anything
          reads the product (a bias Add stays after it, whole).
Then, in every sharded layer, a `num_heads` attribute (RotaryEmbedding) is divided by tp, and
the KV-cache inputs/outputs carry Nkv / tp heads. Weights stay lazy: a slice reads its source
tensor when the rank's model is written.
Check: refuses (with the reason) a sharded MatMul whose weight is not an initializer or whose
split dimension does not divide by tp.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from compiler.frontend.sharding import ShardSpec
from compiler.ir import meta
from compiler.ir.builder import initializer_bytes
from compiler.passes.base import Pass, PassResult

DOMAIN = "kiln"
KV_PREFIXES = ("past_key.", "past_value.", "present_key.", "present_value.")


def _lazy_slice(value: ir.Value, index: tuple, shape: tuple[int, ...]) -> None:
    """Replace value's tensor by a lazily evaluated slice of it."""
    src = value.const_value

    def read() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(src.numpy()[index]))

    value.const_value = ir.LazyTensor(read, dtype=src.dtype, shape=ir.Shape(shape), name=value.name)
    value.shape = ir.Shape(shape)


def _cols(parts: list[int], tp: int, r: int) -> np.ndarray:
    """Column indices of rank r: its share of each part (parts: sizes along the split axis)."""
    starts = np.cumsum([0, *parts[:-1]])
    return np.concatenate([np.arange(s + r * (n // tp), s + (r + 1) * (n // tp)) for s, n in zip(starts, parts)])


def all_reduce(graph: ir.Graph, y: ir.Value, name: str) -> ir.Value:
    """Insert `kiln::AllReduce(y)` (sum over the tp group) and redirect y's readers to it."""
    users = list(y.uses())
    node = ir.Node(DOMAIN, "AllReduce", [y], attributes=[ir.AttrString("reduction", "sum"), ir.AttrString("group", "tp")],
                   name=name, num_outputs=1)
    out = node.outputs[0]
    out.name, out.type, out.shape = f"{name}_output_0", y.type, y.shape
    meta.copy_meta(y.producer(), node)
    graph.insert_after(y.producer(), node)
    for user, idx in users:
        user.replace_input_with(idx, out)
    if y.is_graph_output():
        graph.outputs[graph.outputs.index(y)] = out
    return out


def _declare_all_reduce(model: ir.Model) -> None:
    """A model-local function `kiln::AllReduce` whose body is Identity: to ONNX's type and shape
    inference an all-reduce keeps its input's type and shape. No backend runs the body: ONNX
    Runtime's graph is cut at the collective, TensorRT lowers it to a collective layer."""
    if (DOMAIN, "AllReduce", "") in model.functions:
        return
    x = ir.Value(name="x")
    body = ir.Node("", "Identity", [x], num_outputs=1, name="identity")
    body.outputs[0].name = "y"
    graph = ir.Graph([x], body.outputs, nodes=[body], opset_imports={"": 24}, name="AllReduce")
    fn = ir.Function(DOMAIN, "AllReduce", "", graph=graph, attributes=[ir.Attr("reduction", ir.AttributeType.STRING, "sum"),
                                                                       ir.Attr("group", ir.AttributeType.STRING, "tp")])
    model.functions[fn.identifier()] = fn


class TensorParallel(Pass):
    """Split the weights of this tensor-parallel rank by their ShardSpecs and insert the all-reduces."""

    name = "tensor_parallel"

    def __init__(self, specs: tuple[ShardSpec, ...], tp: int, rank: int):
        self.specs = {s.role: s.kind for s in specs}
        self.tp, self.rank = tp, rank
        self.sharded_bytes = self.replicated_bytes = 0  # this rank's weights, after run()

    def run(self, model: ir.Model) -> PassResult:
        g, tp = model.graph, self.tp
        self.replicated_bytes = initializer_bytes(g)
        if tp == 1:
            return PassResult(model, False)
        for node in g:  # whole heads per rank, checked before anything is touched
            heads = node.attributes.get("num_heads")
            if heads is not None and meta.layer_of(node) is not None and heads.as_int() % tp:
                raise KilnError(f"tensor_parallel: {node.name} has {heads.as_int()} heads, not divisible by tp={tp}",
                                "choose a tp that divides the query and KV heads")
        counts = {"column": 0, "row": 0}
        layers: set[int] = set()
        for node in list(g):
            layer = meta.layer_of(node)
            plain_matmul = node.op_type == "MatMul" and not node.domain and layer is not None
            kind = self.specs.get(meta.role_of(node) or "") if plain_matmul else None
            if kind is None:
                continue
            w = node.inputs[1]
            if w is None or w.const_value is None or len(w.shape) != 2:
                raise KilnError(f"tensor_parallel: {node.name} has no [K, N] weight initializer",
                                "run tensor_parallel before passes that rewrite projections")
            (self._column if kind == "column" else self._row)(g, node, w)
            self.sharded_bytes += w.const_value.nbytes
            counts[kind] += 1
            layers.add(layer)
        for node in g:
            if meta.layer_of(node) in layers and "num_heads" in node.attributes:
                node.attributes["num_heads"] = ir.AttrInt64("num_heads", node.attributes["num_heads"].as_int() // tp)
        for v in [*g.inputs, *g.outputs]:
            if v.name.startswith(KV_PREFIXES) and v.shape is not None and isinstance(v.shape[1], int):
                v.shape = ir.Shape([v.shape[0], v.shape[1] // tp, *v.shape[2:]])
        model.graph.opset_imports.setdefault(DOMAIN, 1)
        _declare_all_reduce(model)
        self.replicated_bytes = initializer_bytes(g) - self.sharded_bytes
        note = (f"rank {self.rank}/{tp}: {counts['column']} column- and {counts['row']} row-parallel projections, "
                f"{self.sharded_bytes / 1e6:.1f} MB sharded, {self.replicated_bytes / 1e6:.1f} MB replicated")
        return PassResult(model, True, [note])

    def _column(self, g: ir.Graph, node: ir.Node, w: ir.Value) -> None:
        K, N = w.shape
        y = node.outputs[0]
        users = [u for u, _ in y.uses()]
        bias = next((u for u in users if u.op_type == "Add" and u.inputs[1] is not None and u.inputs[1].const_value is not None), None)
        out = bias.outputs[0] if bias is not None else y
        split = next((u for u, _ in out.uses() if u.op_type == "Split"), None)
        parts = [int(s) for s in split.inputs[1].const_value.numpy()] if split is not None else [N]
        if any(p % self.tp for p in parts):
            raise KilnError(f"tensor_parallel: {node.name} has {parts} output features, not divisible by tp={self.tp}",
                            "choose a tp that divides the heads and the intermediate size")
        cols = _cols(parts, self.tp, self.rank)
        _lazy_slice(w, (slice(None), cols), (K, len(cols)))
        if bias is not None:
            _lazy_slice(bias.inputs[1], (cols,), (len(cols),))
            self.sharded_bytes += bias.inputs[1].const_value.nbytes
        if split is not None:  # a fresh constant: the original may be shared with other Splits
            sizes = np.array([p // self.tp for p in parts], dtype=np.int64)
            const = ir.Value(name=f"{split.name}_sizes_tp", const_value=ir.Tensor(sizes),
                             type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(parts)]))
            g.register_initializer(const)
            split.replace_input_with(1, const)

    def _row(self, g: ir.Graph, node: ir.Node, w: ir.Value) -> None:
        K, N = w.shape
        if K % self.tp:
            raise KilnError(f"tensor_parallel: {node.name} has {K} input features, not divisible by tp={self.tp}",
                            "choose a tp that divides the heads and the intermediate size")
        k = K // self.tp
        _lazy_slice(w, (slice(self.rank * k, (self.rank + 1) * k), slice(None)), (k, N))
        all_reduce(g, node.outputs[0], node.name.removesuffix("/MatMul") + "/AllReduce")
