"""rmsnorm_residual: schema and shape inference, reference vs decomposition (ONNX Runtime),
Triton kernel vs reference (TRITON_INTERPRET=1 on CPU, the real GPU when present), a TensorRT
engine built around the plugin, and the rewrite pass on a kiln graph."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import plugins
from plugins.testing import assert_close, run_decomposition, run_kernel, gpu_check as _gpu_check

PLUGIN = plugins.get("rmsnorm_residual")
F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _inputs(dtype, rows=5, H=96, seed=0):
    rng = np.random.default_rng(seed)
    x, r = (rng.standard_normal((rows, H)).astype(dtype) for _ in range(2))
    return x, r, rng.uniform(0.5, 1.5, H).astype(dtype)


def test_schema_and_shape_inference():
    assert PLUGIN.infer([F16, F16, F16], [["B", "S", 96], ["B", "S", 96], [96]], {"epsilon": 1e-6}) == [
        (F16, ["B", "S", 96]), (F16, ["B", "S", 96])]
    with pytest.raises(ValueError, match="weight \\[64\\] must be \\[H\\] with H = 96"):
        PLUGIN.infer([F32] * 3, [[2, 96], [2, 96], [64]], {})
    with pytest.raises(ValueError, match="x is 1 but residual is 10"):
        PLUGIN.infer([F32, F16, F32], [[2, 96], [2, 96], [96]], {})
    m = PLUGIN.model([(F32, ["B", 96]), (F32, ["B", 96]), (F32, [96])])
    onnx.checker.check_model(m)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)  # through the decomposition function
    assert [d.dim_param or d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == ["B", 96]


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 1e-2)])
def test_decomposition_matches_reference(dtype, tol):
    x, r, w = _inputs(dtype)
    want = PLUGIN.reference(x, r, w, 1e-6)
    got = run_decomposition(PLUGIN, [x, r, w], {"epsilon": 1e-6})
    for a, b in zip(got, want):
        assert_close(a, b, tol)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 1e-2)])
def test_kernel_matches_reference(dtype, tol):
    x, r, w = _inputs(dtype, rows=7, H=100)  # H not a power of two: masked lanes
    want = PLUGIN.reference(x, r, w, 1e-6)
    for a, b in zip(run_kernel(PLUGIN, [x, r, w], {"epsilon": 1e-6}), want):
        assert_close(a, b, tol)


def test_tensorrt_engine_builds_around_the_plugin(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from plugins.tensorrt import build_engine

    model = tmp_path / "op.onnx"
    onnx.save(PLUGIN.model([(F16, ["B", 96]), (F16, ["B", 96]), (F16, [96])], with_function=False), model)
    record = build_engine(model, tmp_path / "op.engine", [PLUGIN.name])
    assert record["ok"], record["errors"]
    assert record["plugin_layers"] == ["RmsNormResidual"] and record["layers"] == ["PLUGIN_V3"]
    assert (tmp_path / "op.engine").stat().st_size == record["bytes"] > 0


def test_rewrite_fuses_every_residual_norm_of_a_decoder(tiny_model):
    from compiler.passes import PassManager, make
    from plugins.onnxruntime import decompose

    model = PassManager(make(["shape_inference"]) + [PLUGIN.make_rewrite()]).run(tiny_model())
    fused = [n for n in model.graph if n.op_type == "RmsNormResidual"]
    # mlp_norm of both layers and attn_norm of layer 1 (the final norm reads GatherND, not the Add)
    assert sorted(n.name for n in fused) == ["/layers.0/mlp_norm/RmsNormResidual", "/layers.1/attn_norm/RmsNormResidual",
                                            "/layers.1/mlp_norm/RmsNormResidual"]
    assert ("kiln", "RmsNormResidual", "") in model.functions
    plain = decompose(model)
    assert not [n for n in plain.graph if n.domain == "kiln"] and not plain.functions


@pytest.mark.gpu
def test_kernel_on_a_gpu_matches_reference():
    """The same comparison on a real GPU (skipped without one): fp16 inputs at a decode shape."""
    _gpu_check(PLUGIN)
