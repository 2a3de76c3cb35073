"""Calibrated schemes end to end on tiny models: smoothing preserves the function, AWQ's
search never loses to no scaling, each scheme builds and records its quality, limits fail builds."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from compiler import passes
from compiler.cli import main
from compiler.frontend import models
from compiler.frontend.checkpoint import Checkpoint
from compiler.passes.quant import qdq
from compiler.passes.quant.smoothing import fold, groups, private, set_const, sink_of

CAL = {"samples": 2, "seq_len": 64}


def _graph(src, max_seq=64):
    ckpt = Checkpoint.open(src)
    arch = models.lookup(ckpt.config)
    model = arch.build(arch.config(ckpt.config), ckpt, max_seq)
    return passes.PassManager(passes.make(["merge_qkv", "merge_gate_up", "dce"])).run(model)


def _logits(model, ids):
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "position_ids": np.arange(ids.shape[1])[None], "logits_positions": np.arange(ids.shape[1])[None]}
    for i in sess.get_inputs():
        if i.name.startswith("past_"):
            feeds[i.name] = np.zeros([1, *i.shape[1:]], np.float32)
    return sess.run(["logits"], feeds)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_folding_scales_preserves_the_function(tiny_checkpoints, arch):
    ids = np.array([np.arange(5, 45)])
    model = _graph(tiny_checkpoints[arch])
    before = _logits(model, ids)
    rng, folded = np.random.default_rng(0), 0
    for lins in groups(model.graph):
        sink = sink_of(lins[0].node.inputs[0])
        if sink is None or not private(lins):
            continue
        s = sink.constrain(rng.uniform(0.5, 2.0, lins[0].weight.shape[0])).astype(np.float32)
        fold(sink, s)
        for lin in lins:
            set_const(lin.weight, lin.read() * s[:, None])
        folded += 1
    # per layer: qkv, gate_up (norm scales), o_proj (v columns, GQA-tied), down_proj (up columns); lm_head
    assert folded == 4 * 2 + 1
    np.testing.assert_allclose(_logits(model, ids), before, rtol=1e-4, atol=1e-5)


def test_awq_scale_search_never_loses_to_no_scaling():
    from compiler.passes.quant.awq import Int4Awq, Int4AwqConfig
    from compiler.passes.quant.calibration import ActStats

    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 128)).astype(np.float32) * np.where(np.arange(128) % 17 == 0, 20, 1)  # outlier channels
    w = rng.standard_normal((128, 32)).astype(np.float32)
    stats = {"m": ActStats(np.abs(x).mean(0), np.abs(x).max(0), float(np.abs(x).max()), x, 64)}
    awq = Int4Awq(Int4AwqConfig(scheme="int4-awq", group_size=32), stats)
    s = awq.search_scale(x, stats["m"].mean_abs, [w])

    def loss(scale):
        return float(np.mean((x @ (awq._fq(w * scale[:, None]) / scale[:, None]) - x @ w) ** 2))

    assert loss(s) <= loss(np.ones(128, np.float32))
    assert loss(s) < 0.9 * loss(np.ones(128, np.float32))  # outlier channels make scaling pay off


@pytest.mark.parametrize("scheme,extra", [
    ("int4-awq", {"group_size": 32}),
    ("int8-sq", {"alpha": 0.5}),
    ("fp8", {}),
    ("int8-wo", {}),
])
def test_scheme_builds_and_records_quality(tiny_checkpoints, tmp_path, scheme, extra):
    from tests.conftest import build_artifact

    quant = {"scheme": scheme, **extra}
    if scheme != "int8-wo":
        quant["calibration"] = CAL
    art = build_artifact(tiny_checkpoints["llama"], tmp_path, "q", quantization=quant, quality={"window": 100})
    m = json.loads((art / "kiln.json").read_text())
    q = m["quality"]
    assert q["tokens"] == 100 and q["top1_agreement"] > 0.5 and q["mean_kl"] < 0.5
    if scheme in ("int8-sq", "int8-wo", "fp8"):
        assert abs(q["ppl_increase_pct"]) < 5
    ops = {r["name"] for r in m["graph"]["passes"]}
    assert f"quantize_{scheme.replace('-', '_')}" in ops


def test_violated_quality_limit_fails_the_build_cleanly(tiny_checkpoints, tmp_path, capsys):
    recipe = {"schema": 1, "name": "strict", "source": str(tiny_checkpoints["llama"]), "max_seq": 256,
              "quantization": {"scheme": "int4-rtn", "group_size": 32},
              "quality": {"window": 100, "max_ppl_increase_pct": 0.0, "min_top1_agreement": 1.0}}
    path = tmp_path / "strict.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["build", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kiln: error: strict: quality limit violated") and "perplexity" in err[-1]
    assert not (tmp_path / "out" / "strict").exists()
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("scheme,extra", [("int4-awq", {"group_size": 32}), ("int8-sq", {"alpha": 0.5}), ("fp8", {})])
def test_a_rewrite_plugin_does_not_undo_smoothing(tiny_checkpoints, tmp_path, scheme, extra):
    """With plugins: [rmsnorm_residual] the scheme quantises the same graph (its smoothing keeps
    every sink), so quality is the same as without the plugin."""
    from tests.conftest import build_artifact

    quant = {"scheme": scheme, **extra, "calibration": CAL}
    plain = build_artifact(tiny_checkpoints["llama"], tmp_path, "plain", quantization=quant, quality={"window": 100})
    fused = build_artifact(tiny_checkpoints["llama"], tmp_path, "fused", quantization=quant, quality={"window": 100},
                           plugins=["rmsnorm_residual"])
    a, b = (json.loads((art / "kiln.json").read_text()) for art in (plain, fused))
    notes = lambda m: [n for p in m["graph"]["passes"] if p["name"].startswith("quantize_") for n in p["notes"]]  # noqa: E731
    assert notes(a) == notes(b)  # as many linears smoothed / scaled
    assert any(p["name"] == "fuse_rmsnorm_residual" and p["changed"] for p in b["graph"]["passes"])
    assert b["quality"]["perplexity"] == pytest.approx(a["quality"]["perplexity"], rel=1e-3)


def test_smoothing_refuses_an_op_it_does_not_know():
    """A linear whose input comes from a fused op smoothing cannot see into fails loudly."""
    from compiler.errors import KilnError
    from compiler.passes.quant.smoothing import expect_sink

    x = ir.Value(name="x")
    node = ir.Node("kiln", "SomeFusedNorm", [x], num_outputs=1, name="/layers.0/fused")
    with pytest.raises(KilnError, match="kiln::SomeFusedNorm"):
        expect_sink(node.outputs[0], "/layers.0/attn/qkv_proj/MatMul")
    assert expect_sink(x, "graph input") is None


def test_searches_take_the_first_of_near_ties():
    """A loss lower only by float noise does not win: the choice cannot depend on the CPU's
    summation order (old searches took the strict minimum of float32 losses)."""
    from compiler.passes.quant.base import stable_argmin

    assert stable_argmin([1.0, 1.0 - 1e-13, 2.0]) == 0
    assert stable_argmin([1.0, 0.99, 0.99 - 1e-14]) == 1
    errs = np.array([[1.0, 5.0], [1.0 - 1e-12, 4.0]])  # [candidates, blocks]
    assert stable_argmin(errs).tolist() == [0, 1]
