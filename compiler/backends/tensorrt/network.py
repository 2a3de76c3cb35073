"""The lowering context: walks the standard-op IR graph and builds a TensorRT network.

Only nodes the graph outputs depend on are lowered, in graph order, each through the op table
(ops.py, attention.py, quant.py). Float activations and weights take the engine's compute
dtype (fp16 or bf16; norms run in fp32 inside); int64 inputs become int32 bindings. Numpy
arrays handed to TensorRT as weights are kept alive until the engine is serialised (TensorRT
does not copy them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir

from compiler.backends.tensorrt.trt_module import Flavour
from compiler.errors import KilnError

COMPUTE = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


class LoweringError(KilnError):
    """An op or pattern the backend cannot lower: names the node and the way around it."""

    def __init__(self, node: ir.Node, why: str, fix: str):
        super().__init__(f"TensorRT backend: cannot lower {node.op_type} node {node.name}: {why}", fix)


@dataclass
class Lowering:
    flavour: Flavour
    dtype: str  # "float16" | "bfloat16"
    net: object = None
    values: dict = field(default_factory=dict)  # ir.Value -> ITensor
    inputs: dict = field(default_factory=dict)  # graph input name -> ITensor
    keep: list = field(default_factory=list)  # arrays backing trt.Weights
    shared: dict = field(default_factory=dict)  # tensors computed once per network (KV write index, lengths)
    _consts: dict = field(default_factory=dict)  # id(ir.Value) -> ITensor, shared constants

    @property
    def trt(self):
        return self.flavour.trt

    @property
    def np_dtype(self):
        return COMPUTE[self.dtype]

    @property
    def trt_dtype(self):
        return self.trt.float16 if self.dtype == "float16" else self.trt.bfloat16

    # -- constants ------------------------------------------------------------------------
    def weights(self, array: np.ndarray, trt_type=None, count: int | None = None):
        """count: elements when they are not bytes of `array` (packed int4)."""
        array = np.ascontiguousarray(array)
        self.keep.append(array)
        if trt_type is None:
            return self.trt.Weights(array)
        return self.trt.Weights(trt_type, array.ctypes.data, count or array.size)

    def constant(self, array: np.ndarray, name: str | None = None, trt_type=None, shape=None):
        """A constant layer; float arrays are converted to the compute dtype (bf16 via ml_dtypes)."""
        if trt_type is None and array.dtype.kind == "f":
            array = array.astype(self.np_dtype)
            trt_type = self.trt_dtype if self.dtype == "bfloat16" else None
        shape = tuple(shape or array.shape)
        layer = self.net.add_constant(shape, self.weights(array, trt_type, int(np.prod(shape))))
        if name:
            layer.name = name
        return layer.get_output(0)

    def int_const(self, values, dtype=np.int64):
        return self.constant(np.asarray(values, dtype=dtype))

    def const_value(self, v: ir.Value) -> np.ndarray | None:
        return None if v is None or v.const_value is None else v.const_value.numpy()

    # -- tensors of the IR ----------------------------------------------------------------
    def get(self, v: ir.Value):
        if v.name in self.inputs:
            return self.inputs[v.name]
        if v in self.values:
            return self.values[v]
        if v.const_value is not None:
            t = self._consts.get(id(v))
            if t is None:
                t = self._consts[id(v)] = self.constant(v.const_value.numpy(), name=f"{v.name}/const")
            return t
        raise KeyError(f"value {v.name} has not been lowered")

    def name(self, layer, node: ir.Node, suffix: str = ""):
        layer.name = node.name + suffix
        return layer

    # -- shape helpers --------------------------------------------------------------------
    def shape(self, t):
        return self.net.add_shape(t).get_output(0)  # int64 [rank]

    def dims(self, t, start: int, stop: int):
        """Dimensions start:stop of t as an int64 shape tensor."""
        return self.net.add_slice(self.shape(t), (start,), (stop - start,), (1,)).get_output(0)

    def concat(self, parts):
        return self.net.add_concatenation(parts).get_output(0)

    def reshape(self, t, dims, transpose=None, first=None):
        layer = self.net.add_shuffle(t)
        if first is not None:
            layer.first_transpose = tuple(first)
        layer.reshape_dims = tuple(int(d) for d in dims)
        if transpose is not None:
            layer.second_transpose = tuple(transpose)
        return layer.get_output(0)

    def to_rank(self, t, rank: int):
        """Prepend 1s so an elementwise operand matches the other's rank (TensorRT broadcasts
        only between equal ranks)."""
        missing = rank - len(t.shape)
        if missing <= 0:
            return t
        return self.net.add_unsqueeze(t, self.int_const(list(range(missing)))).get_output(0)

    def cast(self, t, trt_type):
        return t if t.dtype == trt_type else self.net.add_cast(t, trt_type).get_output(0)
