"""kv_attention: schema, decomposition and Triton kernel vs the reference (GQA, per-sequence
lengths, sliding window, explicit scale), and why it exists: TensorRT's parser drops the
standard Attention's per-sequence lengths, while the plugin layer consumes them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import plugins
from plugins.testing import assert_close, run_decomposition, run_kernel, gpu_check as _gpu_check

PLUGIN = plugins.get("kv_attention")
T = onnx.TensorProto
CASES = [{}, {"window": 4}, {"scale": 0.3}, {"window": 1}]


def _inputs(dtype, seed=0, B=2, NQ=4, NKV=2, S=3, M=40, D=16):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, NQ, S, D)).astype(dtype)
    k, v = (rng.standard_normal((B, NKV, M, D)).astype(dtype) for _ in range(2))
    pos = np.array([[10, 11, 12], [20, 21, 22]], dtype=np.int64)[:, :S]
    lengths = pos[:, -1] + 1  # a batch of two lengths: row 0 must not see row 1's later entries
    return [q, k, v, pos, lengths]


def test_schema_and_shape_inference():
    F = T.FLOAT16
    shapes = [["B", 8, "S", 64], ["B", 2, 512, 64], ["B", 2, 512, 64], ["B", "S"], ["B"]]
    assert PLUGIN.infer([F, F, F, T.INT64, T.INT64], shapes, {}) == [(F, ["B", 8, "S", 64])]
    with pytest.raises(ValueError, match="query heads \\(6\\) must be a multiple of KV heads \\(4\\)"):
        PLUGIN.infer([F, F, F, T.INT64, T.INT64], [["B", 6, 1, 64], ["B", 4, 8, 64], ["B", 4, 8, 64], ["B", 1], ["B"]], {})
    onnx.checker.check_model(PLUGIN.model([(F, s) for s in shapes[:3]] + [(T.INT64, shapes[3]), (T.INT64, shapes[4])]))


@pytest.mark.parametrize("attrs", CASES)
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 1e-2)])
def test_decomposition_matches_reference(attrs, dtype, tol):
    x = _inputs(dtype)
    assert_close(run_decomposition(PLUGIN, x, attrs)[0], PLUGIN.reference(*x, **PLUGIN.attributes(attrs))[0], tol)


@pytest.mark.parametrize("attrs", CASES)
def test_kernel_matches_reference(attrs):
    x = _inputs(np.float32, seed=1)
    assert_close(run_kernel(PLUGIN, x, attrs)[0], PLUGIN.reference(*x, **PLUGIN.attributes(attrs))[0], 1e-5)


def test_lengths_reach_tensorrt_only_through_the_plugin(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from plugins.tensorrt import build_engine

    F = T.FLOAT16
    q, kv = ["B", 4, "S", 64], ["B", 2, 128, 64]
    model = tmp_path / "kv.onnx"
    onnx.save(PLUGIN.model([(F, q), (F, kv), (F, kv), (T.INT64, ["B", "S"]), (T.INT64, ["B"])], {"window": 16},
                           with_function=False), model)
    plugged = build_engine(model, tmp_path / "kv.engine", [PLUGIN.name])
    assert plugged["ok"], plugged["errors"]
    assert plugged["plugin_layers"] == ["KvAttention"] and "lengths" in plugged["inputs_used"]
    ins = [helper.make_tensor_value_info(n, F, s) for n, s in (("q", q), ("k", kv), ("v", kv))]
    ins.append(helper.make_tensor_value_info("lengths", T.INT64, ["B"]))
    node = helper.make_node("Attention", ["q", "k", "v", "", "", "", "lengths"], ["y"])  # nonpad_kv_seqlen
    graph = helper.make_graph([node], "standard", ins, [helper.make_tensor_value_info("y", F, q)])
    standard = tmp_path / "standard.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)], ir_version=10), standard)
    native = build_engine(standard, tmp_path / "standard.engine", [])
    assert native["ok"] and "ATTENTION_INPUT" in native["layers"]
    assert "lengths" not in native["inputs_used"]  # the parser dropped the per-sequence lengths


@pytest.mark.gpu
def test_kernel_on_a_gpu_matches_reference():
    """The same comparison on a real GPU (skipped without one): fp16 inputs at a decode shape."""
    _gpu_check(PLUGIN)
