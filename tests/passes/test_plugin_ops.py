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


@pytest.mark.parametrize("name,message", [("nope", "unknown plugin 'nope'"), ("sample", "plugin sample has no rewrite pass")])
def test_unusable_plugins_are_refused(tiny_checkpoints, tmp_path, name, message):
    with pytest.raises(KilnError, match=message):
        build_artifact(tiny_checkpoints["llama"], tmp_path, "x", plugins=[name])
    assert not (tmp_path / "x").exists()


def test_plugins_with_tensor_parallel_ranks(tiny_checkpoints, tmp_path):
    art = build_artifact(tiny_checkpoints["llama"], tmp_path, "tp2", parallel={"tp": 2}, plugins=["rmsnorm_residual"])
    engine = json.loads((art / "engine.json").read_text())
    assert [s["collective"] for s in engine["parallel"]["ranks"][0]["steps"] if "collective" in s] == ["AllReduce"] * 4
    assert json.loads((art / "kiln.json").read_text())["plugins"][0]["nodes"] == 3
    assert np.isfinite(engine["vocab_size"])
