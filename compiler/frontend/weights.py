"""Checked, lazy access to checkpoint weights for the graph builders.

A builder asks for each weight by its checkpoint name and the shape it expects; a missing
weight or a wrong shape is a one-line KilnError before anything is written. The returned
graph value reads the tensor only when the model is serialised (`transpose=True` gives the
[in, out] layout MatMul wants from a Hugging Face [out, in] linear weight).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from compiler.frontend.checkpoint import Checkpoint
from compiler.ir.builder import GraphBuilder

_FLOAT_TAGS = {"F32", "F16", "BF16", "F64"}


class Weights:
    def __init__(self, ckpt: Checkpoint, builder: GraphBuilder, dtype=np.float32):
        self.ckpt = ckpt
        self.b = builder
        self.dtype = np.dtype(dtype)

    def has(self, name: str) -> bool:
        return self.ckpt.has(name)

    def get(self, name: str, shape: tuple[int, ...], transpose: bool = False, offset: float = 0.0) -> ir.Value:
        """Initializer for checkpoint tensor `name`, checked against `shape` (checkpoint layout).
        offset is added on read (Gemma stores RMSNorm weights as w - 1)."""
        self._check(name, shape)
        ckpt, dtype = self.ckpt, self.dtype

        def read() -> np.ndarray:
            arr = np.asarray(ckpt.read(name), dtype=dtype)
            arr = transposed(arr) if transpose else np.ascontiguousarray(arr)
            return arr + dtype.type(offset) if offset else arr

        out_shape = tuple(reversed(shape)) if transpose else tuple(shape)
        return self.b.weight(name, out_shape, self._ir_dtype, read)

    def stack(self, names: list[str], shape: tuple[int, int], label: str, transpose: bool = False) -> ir.Value:
        """[len(names), *shape] from tensors of one shape (MoE experts), read lazily; each is
        checked like get(); transpose applies to each."""
        for n in names:
            self._check(n, shape)
        ckpt, dtype = self.ckpt, self.dtype

        def read() -> np.ndarray:
            arrs = [np.asarray(ckpt.read(n), dtype=dtype) for n in names]
            return np.stack([transposed(a) for a in arrs] if transpose else arrs)

        out_shape = tuple(reversed(shape)) if transpose else tuple(shape)
        return self.b.weight(label, (len(names), *out_shape), self._ir_dtype, read)

    @property
    def _ir_dtype(self) -> ir.DataType:
        return ir.DataType.FLOAT if self.dtype == np.float32 else ir.DataType.FLOAT16

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.ckpt.has(name):
            raise KilnError(f"checkpoint {self.ckpt.root} lacks weight {name}", "use the complete checkpoint for this architecture")
        info = self.ckpt.info(name)
        if tuple(info.shape) != tuple(shape):
            raise KilnError(
                f"weight {name} has shape {list(info.shape)} but config.json implies {list(shape)}",
                "check that config.json belongs to these weights",
            )
        if info.dtype not in _FLOAT_TAGS:
            raise KilnError(f"weight {name} has dtype {info.dtype}, expected a float type", "use an unquantized checkpoint")
        self.ckpt.claimed.add(name)


def transposed(a: np.ndarray, rows: int = 64) -> np.ndarray:
    """a [N, K] -> contiguous [K, N], copied `rows` source rows at a time (each tile stays in cache:
    ~6x faster than numpy's element-strided copy of a large matrix)."""
    if a.ndim != 2:
        return np.ascontiguousarray(a.T)
    out = np.empty((a.shape[1], a.shape[0]), dtype=a.dtype)
    for i in range(0, a.shape[0], rows):
        out[:, i:i + rows] = a[i:i + rows].T
    return out
