"""sample: schema, reference semantics, decomposition (ONNX Runtime) and Triton kernel equal to
the reference token for token with fixed draws, and a TensorRT engine around the plugin."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import plugins
from plugins.testing import run_decomposition, run_kernel, gpu_check as _gpu_check

PLUGIN = plugins.get("sample")


def _batch(seed: int, B: int = 32, V: int = 1000):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    logits[:, 7] = logits[:, 11] = logits.max() + 1  # a tie for the greedy rows: the lower id wins
    return [logits, rng.choice([0.0, 0.5, 1.0, 1.5], B).astype(np.float32), rng.choice([0, 1, 5, 50], B).astype(np.int64),
            rng.choice([1.0, 0.9, 0.5, 0.1], B).astype(np.float32), rng.uniform(0, 1, B).astype(np.float32)]


def test_schema_and_shape_inference():
    I64, F = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    assert PLUGIN.infer([F, F, I64, F, F], [["B", 49152], ["B"], ["B"], ["B"], ["B"]], {}) == [(I64, ["B"])]
    with pytest.raises(ValueError, match="top_k has element type 1; top_k is int64"):
        PLUGIN.infer([F, F, F, F, F], [["B", 8], ["B"], ["B"], ["B"], ["B"]], {})
    m = PLUGIN.model([(F, ["B", 16]), (F, ["B"]), (I64, ["B"]), (F, ["B"]), (F, ["B"])])
    onnx.checker.check_model(m)
    out = onnx.shape_inference.infer_shapes(m, strict_mode=True).graph.output[0]
    assert out.type.tensor_type.elem_type == I64


def test_reference_semantics():
    logits, temp, topk, topp, draws = _batch(0)
    greedy = temp <= 0
    got = PLUGIN.reference(logits, temp, topk, topp, draws)[0]
    assert (got[greedy] == 7).all()  # first of the tied maxima
    one = PLUGIN.reference(logits, np.ones_like(temp), np.ones_like(topk), np.ones_like(topp), draws)[0]
    np.testing.assert_array_equal(one, np.argmax(logits, -1))  # top_k 1 is greedy
    # unrestricted sampling follows softmax: empirical frequencies over many draws
    row = np.array([[2.0, 1.0, 0.0, -1.0]], dtype=np.float32)
    u = np.random.default_rng(1).uniform(0, 1, 20000).astype(np.float32)
    picks = np.array([PLUGIN.reference(row, np.ones(1, np.float32), np.zeros(1, np.int64), np.ones(1, np.float32), d[None])[0][0]
                      for d in u[:4000]])
    freq = np.bincount(picks, minlength=4) / len(picks)
    np.testing.assert_allclose(freq, np.exp(row[0]) / np.exp(row[0]).sum(), atol=0.03)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decomposition_equals_reference(seed):
    batch = _batch(seed)
    np.testing.assert_array_equal(run_decomposition(PLUGIN, batch)[0], PLUGIN.reference(*batch)[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_equals_reference(seed):
    batch = _batch(seed, B=8, V=300)  # V not a power of two: padded lanes
    np.testing.assert_array_equal(run_kernel(PLUGIN, batch)[0], PLUGIN.reference(*batch)[0])


def test_tensorrt_engine_builds_around_the_plugin(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from plugins.tensorrt import build_engine

    I64, F = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    model = tmp_path / "op.onnx"
    onnx.save(PLUGIN.model([(F, ["B", 512]), (F, ["B"]), (I64, ["B"]), (F, ["B"]), (F, ["B"])], with_function=False), model)
    record = build_engine(model, tmp_path / "op.engine", [PLUGIN.name])
    assert record["ok"], record["errors"]
    assert record["plugin_layers"] == ["Sample"]


@pytest.mark.gpu
def test_kernel_on_a_gpu_matches_reference():
    """The same comparison on a real GPU (skipped without one): fp16 inputs at a decode shape."""
    _gpu_check(PLUGIN)
