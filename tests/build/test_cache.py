"""Build caching: an unchanged recipe + source is not rebuilt, anything that changes the inputs
(or damages the artifact) is; calibration statistics are shared between recipes; the
Makefile does not rebuild an up-to-date recipe target."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from compiler.build.driver import build
from compiler.build.recipe import parse_recipe
from tests.conftest import ROOT, SMOLLM2_DIR


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "kiln-cache"))


def recipe(src, **fields):
    return parse_recipe({"schema": 1, "name": "cached", "source": str(src), "max_seq": 64, "max_batch": 1, **fields})


def test_unchanged_recipe_is_not_rebuilt(tiny_checkpoints, tmp_path):
    first = build(recipe(tiny_checkpoints["llama"]), tmp_path, progress=False)
    stamp = (tmp_path / "cached" / "model.onnx").stat().st_mtime_ns
    again = build(recipe(tiny_checkpoints["llama"]), tmp_path, progress=False)
    assert again["up_to_date"] and again["build_key"] == first["build_key"]
    assert (tmp_path / "cached" / "model.onnx").stat().st_mtime_ns == stamp
    assert not build(recipe(tiny_checkpoints["llama"]), tmp_path, progress=False, force=True).get("up_to_date")


def test_changed_inputs_or_damaged_artifact_rebuild(tiny_checkpoints, tmp_path):
    first = build(recipe(tiny_checkpoints["llama"]), tmp_path, progress=False)
    changed = build(recipe(tiny_checkpoints["llama"], max_batch=2), tmp_path, progress=False)
    assert not changed.get("up_to_date") and changed["build_key"] != first["build_key"]
    (tmp_path / "cached" / "tokenizer.json").write_text("{}")
    assert not build(recipe(tiny_checkpoints["llama"], max_batch=2), tmp_path, progress=False).get("up_to_date")


def test_calibration_is_shared_between_recipes(tiny_checkpoints, tmp_path, monkeypatch):
    import compiler.passes.quant.calibrate_model as cm

    calls = []
    real = cm._collect
    monkeypatch.setattr(cm, "_collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    cal = {"samples": 2, "seq_len": 32}
    for name, scheme in (("sq", "int8-sq"), ("f8", "fp8")):
        build(recipe(tiny_checkpoints["llama"], name=name, quantization={"scheme": scheme, "calibration": cal},
                     quality={"window": 32}), tmp_path, progress=False)
    assert len(calls) == 1
    assert len(list((tmp_path / "kiln-cache" / "calibration").glob("*.npz"))) == 1


@pytest.mark.skipif(not (SMOLLM2_DIR / "config.json").is_file() or shutil.which("make") is None, reason="needs `make model`")
def test_makefile_target_is_up_to_date_after_a_build():
    subprocess.run(["make", "-s", "smollm2-135m"], cwd=ROOT, check=True, capture_output=True)
    assert subprocess.run(["make", "-q", "smollm2-135m"], cwd=ROOT).returncode == 0  # 0 = nothing to do
