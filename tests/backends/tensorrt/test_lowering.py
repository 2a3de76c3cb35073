"""Lowering details that need no engine build: int4 packing order against ONNX's int4 tensors,
the plan header reader, and the refusal of an op the backend cannot lower."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from compiler.backends.tensorrt.quant import pack_int4
from compiler.runtime.plan import read_header


def test_int4_packing_matches_onnx_serialisation():
    rng = np.random.default_rng(0)
    for shape in [(64, 32), (7, 3)]:  # even and odd element counts
        q = rng.integers(-8, 8, size=shape).astype(np.int8)
        onnx_bytes = ir.Tensor(q.astype(ml_dtypes.int4), dtype=ir.DataType.INT4).tobytes()
        assert pack_int4(q).tobytes() == onnx_bytes


def test_int4_packing_low_nibble_first():
    assert pack_int4(np.array([1, -1, -8, 7])).tolist() == [0xF1, 0x78]


def test_plan_header_fields():
    head = bytearray(64)
    head[:4] = b"vtrt"
    head[16:24] = (123456).to_bytes(8, "little")
    head[24:27] = bytes([1, 7, 1])
    head[32] = 0b010110  # SM80, SM86, SM120
    h = read_header(bytes(head))
    assert (h.size, h.version, h.targets) == (123456, "1.7.1", ["SM80", "SM86", "SM120"])
    with pytest.raises(ValueError, match="not a TensorRT plan"):
        read_header(b"\0" * 64)


def test_unknown_op_is_named_with_its_node():
    pytest.importorskip("tensorrt_rtx")
    from compiler.backends.onnxruntime.backend import ModelFacts
    from compiler.backends.tensorrt.backend import check
    from compiler.backends.tensorrt.network import LoweringError
    from compiler.runtime.config import GenerationDefaults

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 4]))
    node = ir.Node("", "Erf", [x], name="/layers.0/mlp/Erf")
    graph = ir.Graph([x], node.outputs, nodes=[node])
    with pytest.raises(LoweringError, match=r"cannot lower Erf node /layers.0/mlp/Erf") as e:
        check(ir.Model(graph, ir_version=10), ModelFacts(1, 1, 4, 8, GenerationDefaults()), num_heads=1)
    assert "backend: onnxruntime" in e.value.fix
