"""Quantisers against numpy references: round-trip bounds, grouping, packing, folding, graphs in ORT."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from compiler.passes.quant.base import int8_per_channel
from compiler.passes.quant.fp8 import fp8_per_channel
from compiler.passes.quant.int4 import fake_quantize, quantize

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("K,group", [(128, 32), (576, 64), (576, 128), (96, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_round_trip_bounds_and_grid(K, group, symmetric):
    w = RNG.standard_normal((K, 40)).astype(np.float32)
    qw = quantize(w, group, symmetric)
    blocks = -(-K // group)
    assert qw.scale.shape == (blocks, 40) and qw.q.shape == (K, 40)
    step = np.repeat(np.abs(qw.scale), group, axis=0)[:K]
    err = np.abs(qw.dequantize() - w)
    if symmetric:
        assert qw.q.min() >= -8 and qw.q.max() <= 7 and qw.zero_point is None
        assert (err <= step * 1.0001).all()  # the side opposite the extreme may clip by up to one step
        assert (err[np.abs(qw.q) < 7] <= step[np.abs(qw.q) < 7] / 2 * 1.0001).all()
        # the largest-magnitude value of each block is represented exactly (maps to -8)
        wb = np.concatenate([w, np.zeros((-K % group, 40), np.float32)]).reshape(blocks, group, 40)
        ext = np.take_along_axis(wb, np.abs(wb).argmax(1)[:, None], 1)[:, 0]
        np.testing.assert_allclose(qw.scale * -8, ext, rtol=1e-6)
    else:
        assert qw.q.min() >= 0 and qw.q.max() <= 15 and qw.zero_point.max() <= 15
        assert (err <= step / 2 * 1.0001).all()


def test_int4_blocks_are_independent_and_clip_shrinks_range():
    w = RNG.standard_normal((128, 8)).astype(np.float32)
    a = quantize(w, 32)
    w2 = w.copy()
    w2[32:] *= 10  # other blocks change: block 0 must not
    b = quantize(w2, 32)
    np.testing.assert_array_equal(a.scale[0], b.scale[0])
    np.testing.assert_array_equal(a.q[:32], b.q[:32])
    clipped = quantize(w, 32, clip=np.full((4, 8), 0.5, np.float32))
    np.testing.assert_allclose(np.abs(clipped.scale), np.abs(a.scale) * 0.5, rtol=1e-6)


def test_int8_and_fp8_per_channel_bounds():
    w = RNG.standard_normal((64, 16)).astype(np.float32) * np.linspace(0.1, 10, 16, dtype=np.float32)
    q, s = int8_per_channel(w)
    assert q.dtype == np.int8 and s.shape == (16,)
    assert (np.abs(q.astype(np.float32) * s - w) <= s / 2 * 1.0001).all()
    q8, s8 = fp8_per_channel(w)
    assert q8.dtype == ml_dtypes.float8_e4m3fn
    deq = q8.astype(np.float32) * s8
    big = np.abs(w) > s8 * 2**-6 * 8  # normal range of E4M3
    assert (np.abs(deq - w)[big] <= np.abs(w)[big] * 2**-4 * 1.0001).all()  # 3 mantissa bits


def _run_single_matmul(make_dq, K=96, N=24):
    """ORT output of x @ DQ(weight) for a one-MatMul graph, with the int4 kernel in fp32 mode."""
    from compiler.passes.quant import qdq

    w = RNG.standard_normal((K, N)).astype(np.float32)
    x_val = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, K]))
    w_val = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([K, N]), const_value=ir.Tensor(w))
    mm = ir.Node("", "MatMul", [x_val, w_val], name="/p/MatMul")
    mm.outputs[0].name = "y"
    graph = ir.Graph([x_val], [mm.outputs[0]], nodes=[mm], initializers=[w_val], opset_imports={"": 24})
    deq = make_dq(graph, qdq.linears(graph)[0], w)
    graph.initializers.pop("w")
    proto = ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    x = RNG.standard_normal((2, K)).astype(np.float32)
    got = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return got, x @ deq


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_qdq_graph_packing_matches_numpy(symmetric):
    from compiler.passes.quant import qdq

    def make(graph, lin, w):
        qw = quantize(w, 32, symmetric)
        qdq.use_int4(graph, lin, lambda: qw, 32, symmetric)
        return qw.dequantize()

    got, want = _run_single_matmul(make)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_int8_fp8_qdq_graphs_match_numpy(kind):
    from compiler.passes.quant import qdq

    def make(graph, lin, w):
        q, s = int8_per_channel(w) if kind == "int8" else fp8_per_channel(w)
        (qdq.use_int8 if kind == "int8" else qdq.use_fp8)(graph, lin, lambda: (q, s))
        return q.astype(np.float32) * s

    got, want = _run_single_matmul(make)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _fake_quantised_checkpoint(src, dst, group, symmetric):
    """The tiny checkpoint with every linear weight replaced by its int4 fake-quantised value."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name, t in tensors.items():
        if t.ndim == 2 and "embed_tokens" not in name:  # [out, in]: blocks run along `in`
            tensors[name] = np.ascontiguousarray(fake_quantize(t.T.astype(np.float32), group, symmetric).T)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_rtn_engine_equals_fp32_engine_of_dequantised_weights(tiny_checkpoints, tmp_path, symmetric):
    """End to end through the frontend, the merge passes, QDQ, ORT's MatMulNBits (fp32 mode)."""
    from compiler.runtime import load
    from tests.backends.onnxruntime.test_parity import engine_logits
    from tests.conftest import build_artifact

    src = tiny_checkpoints["llama"]
    quant = build_artifact(src, tmp_path, "q", onnxruntime={"int4_accuracy_level": 0},
                           quantization={"scheme": "int4-rtn", "group_size": 32, "symmetric": symmetric},
                           quality={"window": 100})
    ref = build_artifact(_fake_quantised_checkpoint(src, tmp_path / "fq", 32, symmetric), tmp_path, "ref")
    ids = np.array([RNG.integers(3, 300, 40)])
    np.testing.assert_allclose(engine_logits(load(quant), ids), engine_logits(load(ref), ids), rtol=1e-4, atol=1e-4)
    manifest = json.loads((quant / "kiln.json").read_text())
    assert manifest["quantization"]["scheme"] == "int4-rtn" and manifest["quality"]["tokens"] == 100
    # the artifact holds standard QDQ (ORT fuses it into MatMulNBits at load): every linear but the
    # embedding reads its weight through DequantizeLinear of a 4-bit initializer, blocked along K
    import onnx

    model = onnx.load(str(quant / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" not in ops and "MatMul" in ops
    four_bit = onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert dq and all(inits[n.input[0]].data_type == four_bit for n in dq)
    assert all({a.name: a.i for a in n.attribute}.get("block_size") == 32 for n in dq)
    assert all((len(n.input) == 3) == (not symmetric) for n in dq)  # a zero point only when asymmetric
    dq_out = {n.output[0] for n in dq}
    weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in set(inits) | dq_out]
    assert weights and all(w in dq_out for w in weights), "a linear kept fp32 weights"


@pytest.mark.parametrize("scheme", ["int4-rtn", "int8-wo"])
def test_quantised_weights_are_made_when_saved_and_not_kept(scheme):
    """A quantised build holds no model's worth of quantised arrays: each linear's are made when
    its initializers are written (and the same as made eagerly), then forgotten."""
    from compiler.passes.quant import quantizer
    from compiler.passes.quant.int4 import quantize as eager_int4
    from compiler.passes.quant.rtn import Int4RtnConfig
    from compiler.passes.quant.int8_wo import Int8WoConfig

    K, N = 64, 24
    w = RNG.standard_normal((K, N)).astype(np.float32)
    reads = []
    lazy_w = ir.LazyTensor(lambda: reads.append(1) or ir.Tensor(w), dtype=ir.DataType.FLOAT, shape=ir.Shape([K, N]), name="w")
    x_val = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, K]))
    w_val = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([K, N]), const_value=lazy_w)
    mm = ir.Node("", "MatMul", [x_val, w_val], name="/p/MatMul")
    graph = ir.Graph([x_val], [mm.outputs[0]], nodes=[mm], initializers=[w_val], opset_imports={"": 24})
    cfg = Int4RtnConfig(scheme="int4-rtn", group_size=32) if scheme == "int4-rtn" else Int8WoConfig(scheme="int8-wo")
    quantizer(cfg).run(ir.Model(graph, ir_version=10))
    made = {name: v for name, v in graph.initializers.items() if name.startswith("p.weight_")}
    assert made and all(isinstance(v.const_value, ir.LazyTensor) for v in made.values())
    assert not reads  # the pass read no weight: that happens as the model is saved
    q = made["p.weight_q"].const_value.numpy()
    want = eager_int4(w, 32).q if scheme == "int4-rtn" else int8_per_channel(w)[0]
    np.testing.assert_array_equal(np.asarray(q, dtype=np.int8), want)
