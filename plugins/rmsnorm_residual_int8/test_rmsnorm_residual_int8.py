"""rmsnorm_residual_int8: the int8 output equals the reference exactly (decomposition through
ONNX Runtime's QuantizeLinear, and the Triton kernel), saturation included; a TensorRT engine
builds around the plugin."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import plugins
from plugins.testing import assert_close, run_decomposition, run_kernel

PLUGIN = plugins.get("rmsnorm_residual_int8")
F32 = onnx.TensorProto.FLOAT


def _inputs(seed: int, scale: float):
    rng = np.random.default_rng(seed)
    x, r = (rng.standard_normal((6, 96)).astype(np.float32) for _ in range(2))
    return [x, r, rng.uniform(0.5, 1.5, 96).astype(np.float32), np.array(scale, dtype=np.float32)]


def test_schema():
    assert PLUGIN.infer([F32] * 4, [["B", 96], ["B", 96], [96], []], {}) == [(onnx.TensorProto.INT8, ["B", 96]), (F32, ["B", 96])]
    with pytest.raises(ValueError, match="scale must be a scalar"):
        PLUGIN.infer([F32] * 4, [["B", 96], ["B", 96], [96], [96]], {})


@pytest.mark.parametrize("seed,scale", [(0, 0.02), (1, 0.01), (2, 0.005)])  # 0.005: many values saturate
def test_int8_output_is_exact(seed, scale):
    x = _inputs(seed, scale)
    want = PLUGIN.reference(*x, epsilon=1e-6)
    for run in (run_decomposition(PLUGIN, x, {"epsilon": 1e-6}), run_kernel(PLUGIN, x, {"epsilon": 1e-6})):
        np.testing.assert_array_equal(run[0], want[0])
        assert_close(run[1], want[1], 1e-5)
    assert (np.abs(want[0].astype(int)) == 127).any() or (want[0] == -128).any() or scale > 0.005


def test_tensorrt_engine_builds_around_the_plugin(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from plugins.tensorrt import build_engine

    F16 = onnx.TensorProto.FLOAT16
    model = tmp_path / "op.onnx"
    onnx.save(PLUGIN.model([(F16, ["B", 96]), (F16, ["B", 96]), (F16, [96]), (F16, [])], with_function=False), model)
    record = build_engine(model, tmp_path / "op.engine", [PLUGIN.name])
    assert record["ok"], record["errors"]
    assert record["plugin_layers"] == ["RmsNormResidualInt8"]
