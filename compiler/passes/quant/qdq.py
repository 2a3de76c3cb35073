"""Quantised weights and activations as standard ONNX QDQ in the IR.

int4:  DequantizeLinear(Wq int4|uint4 [K, N], scale [K/g, N], zp, axis=0, block_size=g) -> MatMul
int8:  DequantizeLinear(Wq int8 [K, N], scale [N], axis=1) -> MatMul
act:   QuantizeLinear(x, s) -> DequantizeLinear(., s) -> MatMul   (static per-tensor scale)
The same graph feeds every backend; ONNX Runtime fuses DQ(int4 block) + MatMul into MatMulNBits.
Quantised weights are lazy: a scheme hands over how to make them, and they are made one linear at
a time as the model is saved, so a build's memory does not grow with the model's depth.
Node and initializer names keep the linear's scope: `/layers.3/attn/qkv_proj/weight_dq`; the
inserted nodes carry the MatMul's layer and role (compiler/ir/meta.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from compiler.ir import meta
from compiler.passes.quant.int4 import QuantizedWeight


@dataclass
class Linear:
    node: ir.Node  # the MatMul
    weight: ir.Value  # [K, N] constant

    @property
    def scope(self) -> str:
        return self.node.name.rsplit("/", 1)[0]

    def prefix(self, part: str) -> str:
        """Initializer names for this linear's `part` ("weight", "input"): `layers.3.attn.qkv_proj.weight`."""
        return f"{self.scope}/{part}".lstrip("/").replace("/", ".")

    def read(self) -> np.ndarray:
        return np.asarray(self.weight.const_value.numpy(), dtype=np.float32)


def linears(graph: ir.Graph) -> list[Linear]:
    """MatMuls with a constant float [K, N] weight, in graph order."""
    out = []
    for node in graph:
        if node.op_type == "MatMul" and node.inputs[1] is not None:
            w = node.inputs[1]
            if w.const_value is not None and w.dtype == ir.DataType.FLOAT and len(w.shape) == 2:
                out.append(Linear(node, w))
    return out


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.Tensor(array, name=name) if dtype is None else ir.Tensor(array, dtype=dtype, name=name)
    v = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
    graph.register_initializer(v)
    return v


def dequantize_weight(graph: ir.Graph, lin: Linear, inputs: list[ir.Value | None], attrs: list[ir.Attr]) -> None:
    dq = ir.Node("", "DequantizeLinear", inputs, attributes=attrs, name=f"{lin.scope}/weight_dq")
    dq.outputs[0].name = f"{lin.scope}/weight_dq_output_0"
    dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), lin.weight.shape
    meta.copy_meta(lin.node, dq)
    graph.insert_before(lin.node, dq)
    lin.node.replace_input_with(1, dq.outputs[0])


class _Parts:
    """One linear's quantised arrays, made on the first read of any of them (when the model is
    saved) and forgotten once each was read: a build holds one linear's at a time, whatever the
    depth. A part read again later (a backend inspecting it) is simply made again."""

    def __init__(self, make: Callable[[], dict[str, np.ndarray]], names: list[str]):
        self._make, self._names = make, names
        self._value: dict[str, np.ndarray] | None = None
        self._left: set[str] = set()

    def get(self, key: str) -> np.ndarray:
        if self._value is None:
            self._value, self._left = self._make(), set(self._names)
        arr = self._value[key]
        self._left.discard(key)
        if not self._left:
            self._value = None
        return arr


def lazy_inputs(graph: ir.Graph, lin: Linear, make: Callable[[], dict[str, np.ndarray]],
                 specs: dict[str, tuple[ir.DataType, tuple[int, ...]]]) -> list[ir.Value]:
    """Initializers `<scope>.weight_<key>` for each key of specs ({key: (dtype, shape)}), read lazily from make()."""
    base = lin.prefix("weight")
    parts = _Parts(make, list(specs))
    out = []
    for key, (dtype, shape) in specs.items():
        name = f"{base}_{key}"
        tensor = ir.LazyTensor((lambda k=key, d=dtype, n=name: ir.Tensor(parts.get(k), dtype=d, name=n)),
                               dtype=dtype, shape=ir.Shape(shape), name=name)
        v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=tensor)
        graph.register_initializer(v)
        out.append(v)
    return out


def use_int4(graph: ir.Graph, lin: Linear, make: Callable[[], QuantizedWeight], group: int, symmetric: bool) -> None:
    """make() -> the QuantizedWeight of lin's weight [K, N] (called when the model is saved)."""
    K, N = (int(d) for d in lin.weight.shape)
    G = -(-K // group)
    if symmetric:
        specs = {"q": (ir.DataType.INT4, (K, N)), "scale": (ir.DataType.FLOAT, (G, N))}
    else:
        specs = {"q": (ir.DataType.UINT4, (K, N)), "scale": (ir.DataType.FLOAT, (G, N)), "zp": (ir.DataType.UINT4, (G, N))}

    def arrays() -> dict[str, np.ndarray]:
        qw = make()
        if symmetric != (qw.zero_point is None):
            raise ValueError(f"{lin.node.name}: a {'symmetric' if symmetric else 'asymmetric'} int4 weight was announced")
        if qw.zero_point is None:
            return {"q": qw.q.astype(ml_dtypes.int4), "scale": qw.scale}
        return {"q": qw.q.astype(ml_dtypes.uint4), "scale": qw.scale, "zp": qw.zero_point.astype(ml_dtypes.uint4)}

    inputs = lazy_inputs(graph, lin, arrays, specs)
    dequantize_weight(graph, lin, inputs, [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", group)])


def use_int8(graph: ir.Graph, lin: Linear, make: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
    """make() -> (q int8 [K, N], per-output-channel scale [N]), called when the model is saved."""
    _use_per_channel(graph, lin, make, ir.DataType.INT8, np.int8)


def use_fp8(graph: ir.Graph, lin: Linear, make: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
    """make() -> (q float8e4m3fn [K, N], per-output-channel scale [N]), called when the model is saved."""
    _use_per_channel(graph, lin, make, ir.DataType.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn)


def _use_per_channel(graph: ir.Graph, lin: Linear, make, dtype: ir.DataType, np_dtype) -> None:
    K, N = (int(d) for d in lin.weight.shape)

    def arrays() -> dict[str, np.ndarray]:
        q, scale = make()
        return {"q": q.astype(np_dtype), "scale": scale.astype(np.float32)}

    specs = {"q": (dtype, (K, N)), "scale": (ir.DataType.FLOAT, (N,))}
    dequantize_weight(graph, lin, lazy_inputs(graph, lin, arrays, specs), [ir.AttrInt64("axis", 1)])


def quantize_input(graph: ir.Graph, lin: Linear, scale: float, dtype: ir.DataType) -> None:
    """Static per-tensor activation quantisation in front of the MatMul (int8 or float8e4m3fn)."""
    base = lin.prefix("input")
    s = initializer(graph, f"{base}_scale", np.array(scale, dtype=np.float32))
    zero = np.zeros((), dtype=np.int8) if dtype == ir.DataType.INT8 else np.zeros((), dtype=ml_dtypes.float8_e4m3fn)
    zp = initializer(graph, f"{base}_zp", zero)
    x = lin.node.inputs[0]
    qn = ir.Node("", "QuantizeLinear", [x, s, zp], name=f"{lin.scope}/input_q")
    dq = ir.Node("", "DequantizeLinear", [qn.outputs[0], s, zp], name=f"{lin.scope}/input_dq")
    qn.outputs[0].name, dq.outputs[0].name = f"{lin.scope}/input_q_output_0", f"{lin.scope}/input_dq_output_0"
    qn.outputs[0].type, qn.outputs[0].shape = ir.TensorType(dtype), x.shape
    dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), x.shape
    meta.copy_meta(lin.node, qn, dq)
    graph.insert_before(lin.node, [qn, dq])
    lin.node.replace_input_with(0, dq.outputs[0])
