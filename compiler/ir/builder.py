"""GraphBuilder: writes onnx_ir graphs with hierarchical node names and lazy weights.

Every node is named after the scope it was built in, e.g. `/layers.3/attn/q_proj/MatMul`, so
any node traces back to the checkpoint weight it came from. The same scopes tag each node with
its layer index and role (`kiln.layer`, `kiln.role`, see compiler/ir/meta.py): passes read those,
never the names. Weights enter as `ir.LazyTensor`s that read the checkpoint only when the model
is saved, one tensor at a time.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from compiler.ir import meta

OPSET = 24

_NP_TO_IR = {
    np.dtype("float32"): ir.DataType.FLOAT,
    np.dtype("float16"): ir.DataType.FLOAT16,
    np.dtype("int64"): ir.DataType.INT64,
    np.dtype("int32"): ir.DataType.INT32,
    np.dtype("bool"): ir.DataType.BOOL,
}


def ir_dtype(np_dtype) -> ir.DataType:
    return _NP_TO_IR[np.dtype(np_dtype)]


def initializer_bytes(graph: ir.Graph) -> int:
    """Bytes of the graph's initializers (lazy weights are sized, not read)."""
    return sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)


class GraphBuilder:
    """Appends nodes to one graph; `scope()` nests the hierarchical name prefix, `layer(i)` opens
    layer i's scope."""

    def __init__(self, name: str):
        self.graph = ir.Graph([], [], nodes=[], name=name, opset_imports={"": OPSET})
        self._scope: list[str] = []
        self._layer: tuple[int, int] | None = None  # (layer index, depth of its scope)
        self._used: Counter[str] = Counter()

    # -- naming -------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[None]:
        """Scope `layers.{i}`; its nodes are tagged with layer i and a role relative to it."""
        outer = self._layer
        self._layer = (i, len(self._scope) + 1)
        try:
            with self.scope(f"layers.{i}"):
                yield
        finally:
            self._layer = outer

    def _tag(self, node: ir.Node) -> None:
        layer, depth = self._layer if self._layer is not None else (None, 0)
        meta.tag(node, layer, ".".join(self._scope[depth:]) or None)

    def _name(self, leaf: str) -> str:
        name = "/" + "/".join([*self._scope, leaf])
        self._used[name] += 1
        n = self._used[name]
        return name if n == 1 else f"{name}_{n - 1}"

    # -- graph I/O and weights -------------------------------------------------------------
    def input(self, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
        v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.graph.inputs.append(v)
        return v

    def output(self, value: ir.Value, name: str) -> ir.Value:
        value.name = name
        self.graph.outputs.append(value)
        return value

    def weight(self, name: str, shape: Sequence[int], dtype: ir.DataType, read: Callable[[], np.ndarray]) -> ir.Value:
        """A lazily read initializer; `read()` runs when the model is serialised."""
        tensor = ir.LazyTensor(lambda: ir.Tensor(read()), dtype=dtype, shape=ir.Shape(shape), name=name)
        return self._initializer(name, tensor)

    def const(self, array: np.ndarray, leaf: str) -> ir.Value:
        """A small constant held in memory (shapes, axes, rope tables)."""
        name = self._name(leaf)
        return self._initializer(name, ir.Tensor(np.ascontiguousarray(array), name=name))

    def _initializer(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        v = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape), const_value=tensor)
        self.graph.register_initializer(v)
        return v

    # -- nodes ------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[ir.Value | None], leaf: str | None = None,
           domain: str = "", num_outputs: int = 1, **attrs) -> ir.Value | tuple[ir.Value, ...]:
        name = self._name(leaf or op_type)
        node = ir.Node(domain, op_type, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                       num_outputs=num_outputs, name=name)
        self._tag(node)
        for i, out in enumerate(node.outputs):
            out.name = f"{name}_output_{i}"
        self.graph.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def model(self, metadata: dict[str, str] | None = None) -> ir.Model:
        m = ir.Model(self.graph, ir_version=10, producer_name="kiln")
        if metadata:
            m.metadata_props.update(metadata)
        return m
