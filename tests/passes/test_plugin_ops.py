"""Plugins in a build: the recipe's plugins run their rewrite passes, the backend falls back to
the decomposition where it cannot bind the op (warning in the build log and kiln.json), and the
engine computes what the plain build computes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.errors import KilnError
from compiler.runtime import load
from tests.conftest import build_artifact


def test_onnxruntime_build_falls_back_to_the_decomposition(tiny_checkpoints, tmp_path, capsys):
    src = tiny_checkpoints["llama"]
    plain = load(build_artifact(src, tmp_path, "plain"))
    art = build_artifact(src, tmp_path, "plugged", plugins=["rmsnorm_residual"])
    manifest = json.loads((art / "kiln.json").read_text())
    rec = manifest["plugins"]
    assert rec == [{"op": "kiln::RmsNormResidual", "nodes": 3, "bound": "decomposition",
                    "why": "ONNX Runtime's CPU provider has no kernels for the kiln domain"}]
    assert any(p["name"] == "fuse_rmsnorm_residual" and p["changed"] for p in manifest["graph"]["passes"])
    prompt = "The tiny model says"
    assert load(art).generate(prompt, max_new_tokens=16).token_ids == plain.generate(prompt, max_new_tokens=16).token_ids


def test_tensorrt_build_log_records_the_fallback(tiny_checkpoints, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    art = build_artifact(tiny_checkpoints["llama"], tmp_path, "trt", backend="tensorrt", max_seq=128, max_batch=2,
                         plugins=["rmsnorm_residual"], tensorrt={"targets": ["SM80"]})
    log = (art / "build.log").read_text()
    assert "[WARNING] plugin kiln::RmsNormResidual: 3 nodes run as its decomposition (TensorRT-RTX's network API" in log
    from compiler.runtime.verify import verify_artifact

    verify_artifact(art)  # the warning is in build.log before the manifest hashes it


@pytest.mark.parametrize("name,fields,message", [
    ("nope", {}, "unknown plugin 'nope'"),
    ("sample", {"parallel": {"tp": 2}}, "plugin sample changes the engine's inputs and outputs"),
])
def test_unusable_plugins_are_refused(tiny_checkpoints, tmp_path, name, fields, message):
    with pytest.raises(KilnError, match=message):
        build_artifact(tiny_checkpoints["llama"], tmp_path, "x", plugins=[name], **fields)
    assert not (tmp_path / "x").exists()


def test_engine_that_samples_returns_token_ids(tiny_checkpoints, tmp_path):
    """plugins: [sample]: each step returns next_tokens [B] (logits stay available to evaluation);
    greedy and seeded sampling give the host sampler's tokens."""
    src = tiny_checkpoints["llama"]
    plain = load(build_artifact(src, tmp_path, "plain"))
    art = build_artifact(src, tmp_path, "sampling", plugins=["sample"])
    engine = json.loads((art / "engine.json").read_text())
    assert {"logits", "next_tokens"} <= {t["name"] for t in engine["outputs"]}
    assert {"temperature", "top_k", "top_p", "draws"} <= {t["name"] for t in engine["inputs"]}
    fused = load(art)
    assert fused.session.capabilities.samples and not plain.session.capabilities.samples
    prompts = ["The tiny model says", "Once upon a time"]
    for kw in ({}, {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 3}, {"temperature": 1.2, "seed": 11}):
        got = [g.token_ids for g in fused.generate(prompts, max_new_tokens=12, stop_token_ids=(), **kw)]
        want = [g.token_ids for g in plain.generate(prompts, max_new_tokens=12, stop_token_ids=(), **kw)]
        assert got == want, kw
    s = fused.session  # without sampling inputs a step still returns the logits
    ids = np.array([[5, 6, 7]])
    a = s.step(s.binding(s.new_cache(1)), ids, np.arange(3)[None]).copy()
    b = plain.session.step(plain.session.binding(plain.session.new_cache(1)), ids, np.arange(3)[None])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_plugins_with_tensor_parallel_ranks(tiny_checkpoints, tmp_path):
    art = build_artifact(tiny_checkpoints["llama"], tmp_path, "tp2", parallel={"tp": 2}, plugins=["rmsnorm_residual"])
    engine = json.loads((art / "engine.json").read_text())
    assert [s["collective"] for s in engine["parallel"]["ranks"][0]["steps"] if "collective" in s] == ["AllReduce"] * 4
    assert json.loads((art / "kiln.json").read_text())["plugins"][0]["nodes"] == 3
    assert np.isfinite(engine["vocab_size"])
