"""Real TensorRT-RTX engine builds on CPU, checked from the build's own record (engine.json,
kiln.json, build.log) and the plan header; and the refusals that happen before any build work."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from compiler.build.driver import build
from compiler.errors import KilnError
from compiler.build.recipe import parse_recipe
from compiler.runtime.plan import read_plan_header
from tests.conftest import ROOT, SMOLLM2_DIR, SMOLLM2_GGUF, build_artifact
from tests.passes.test_quant_gguf import smollm2_q4_0  # noqa: F401 (fixture)

pytest.importorskip("tensorrt_rtx")

TARGETS = ["SM80", "SM89"]


def trt_build(src, tmp_path, name, **fields):
    trt = {"targets": TARGETS, "timing_cache": str(tmp_path / "timing.cache"), **fields.pop("tensorrt", {})}
    return build_artifact(src, tmp_path, name, **{"backend": "tensorrt", "max_seq": 128, "max_batch": 2, "tensorrt": trt, **fields})


@pytest.mark.parametrize("arch,precision", [("llama", "float16"), ("qwen2", "float16"), ("mistral", "bfloat16"),
                                            ("qwen3", "float16"), ("phi3", "bfloat16"), ("mixtral", "float16"),
                                            ("qwen3_moe", "float16")])
def test_engine_build_records_bindings_profiles_and_targets(tiny_checkpoints, tmp_path, arch, precision):
    art = trt_build(tiny_checkpoints[arch], tmp_path, f"{arch}-trt", tensorrt={"precision": precision})
    engine = json.loads((art / "engine.json").read_text())
    manifest = json.loads((art / "kiln.json").read_text())
    assert engine["backend"] == "tensorrt" and engine["model_file"] == "rank0.engine"
    names = {t["name"]: t for t in engine["inputs"]}
    assert names["input_ids"]["dtype"] == names["position_ids"]["dtype"] == "int32"
    head_dim = 24 if arch == "qwen3" else 16
    assert names["past_key.0"]["dtype"] == precision and names["past_key.0"]["shape"] == ["batch", 2, 128, head_dim]
    outs = {t["name"]: t for t in engine["outputs"]}
    assert outs["logits"]["dtype"] == "float32" and "present_value.1" in outs
    assert engine["kv_cache"]["dtype"] == precision
    t = engine["tensorrt"]
    assert t["targets"] == TARGETS and t["precision"] == precision
    assert t["profiles"] == [{"batch": [1, 1, 2], "input_len": [1, 128, 128], "logits": [1, 1, 128], "kv_len": 128}]
    assert manifest["backend"]["name"] == "tensorrt_rtx" and manifest["backend"]["targets"] == TARGETS
    header = read_plan_header(art / "rank0.engine")
    assert header.targets == TARGETS and header.size == (art / "rank0.engine").stat().st_size
    log = (art / "build.log").read_text()
    assert "Engine generation completed" in log
    assert "ERROR" not in log.replace("cudaError", "")


CAL = {"samples": 2, "seq_len": 64}


@pytest.mark.parametrize("quantization", [
    {"scheme": "int4-rtn", "group_size": 32, "symmetric": True},
    {"scheme": "int8-wo"},
    {"scheme": "int8-sq", "calibration": CAL},
    {"scheme": "fp8", "calibration": CAL},
])
def test_quantised_engine_builds(tiny_checkpoints, tmp_path, quantization):
    targets = ["SM89", "SM120"] if quantization["scheme"] == "fp8" else TARGETS
    art = trt_build(tiny_checkpoints["llama"], tmp_path, "q-trt", quantization=quantization, tensorrt={"targets": targets})
    assert read_plan_header(art / "rank0.engine").size > 0
    manifest = json.loads((art / "kiln.json").read_text())
    assert manifest["quantization"]["scheme"] == quantization["scheme"]


def test_profiles_and_custom_targets(tiny_checkpoints, tmp_path):
    art = trt_build(tiny_checkpoints["llama"], tmp_path, "p-trt",
                    tensorrt={"targets": ["SM86"], "profiles": [{"batch": [1, 2, 2], "input_len": [1, 16, 64]}]})
    engine = json.loads((art / "engine.json").read_text())
    assert engine["tensorrt"]["profiles"][0]["input_len"] == [1, 16, 64]
    assert read_plan_header(art / "rank0.engine").targets == ["SM86"]


@pytest.mark.parametrize("arch", ["mistral_window16", "gemma3"])
def test_sliding_window_is_refused_before_building(tiny_checkpoints, tmp_path, arch):
    with pytest.raises(KilnError, match="sliding-window") as e:
        trt_build(tiny_checkpoints[arch], tmp_path, "w-trt")
    assert "backend: onnxruntime" in e.value.fix
    assert not list(tmp_path.glob("*w-trt*"))


def test_gemma3_builds_when_the_window_covers_max_seq(tiny_checkpoints, tmp_path):
    """No window mask is needed when every sequence fits in the window: local and global rope,
    q/k norms, sandwich norms and GELU-tanh all lower."""
    art = trt_build(tiny_checkpoints["gemma3"], tmp_path, "g-trt", max_seq=16)
    engine = json.loads((art / "engine.json").read_text())
    assert engine["max_seq"] == 16 and read_plan_header(art / "rank0.engine").targets == TARGETS


@pytest.mark.parametrize("quantization,match", [
    ({"scheme": "int4-rtn", "group_size": 64, "symmetric": True}, "group_size 64 does not divide K=160"),
    ({"scheme": "int4-rtn", "group_size": 32, "symmetric": False}, "signed int4 only"),
    ({"scheme": "fp8", "calibration": CAL}, "fp8 weights cannot be compiled for SM80"),
])
def test_int4_rules_are_checked_before_calibration(tiny_checkpoints, tmp_path, quantization, match):
    with pytest.raises(KilnError, match=match):
        trt_build(tiny_checkpoints["llama"], tmp_path, "r-trt", quantization=quantization)


def test_profile_beyond_the_recipe_limits_is_refused(tiny_checkpoints, tmp_path):
    with pytest.raises(KilnError, match="exceeds max_batch"):
        trt_build(tiny_checkpoints["llama"], tmp_path, "l-trt", tensorrt={"profiles": [{"batch": [1, 1, 8]}]})


@pytest.mark.skipif(not (SMOLLM2_DIR / "config.json").is_file(), reason="run `make model` first")
def test_smollm2_recipe_engine(tmp_path):
    """The shipped fp16 recipe: bindings of the real model, plan within 10% of its weight bytes."""
    recipe = yaml.safe_load((ROOT / "recipes" / "smollm2-135m-trt.yaml").read_text())
    recipe["source"] = str(SMOLLM2_DIR)
    build(parse_recipe(recipe), tmp_path, progress=False)
    art = tmp_path / recipe["name"]
    engine = json.loads((art / "engine.json").read_text())
    assert len(engine["inputs"]) == 3 + 2 * 30 and engine["max_seq"] == 2048
    assert {t["name"]: t["shape"] for t in engine["inputs"]}["past_key.29"] == ["batch", 3, 2048, 64]
    weights = int(re.search(r"Total Weights Memory: (\d+)", (art / "build.log").read_text()).group(1))
    assert weights > 250e6 and (art / "rank0.engine").stat().st_size <= 1.1 * weights


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="run `make model` first")
def test_gguf_8bit_grids_are_refused_by_name_and_an_override_builds(tmp_path):
    """SmolLM2's Q4_1 grids become signed int4 plus the block-constant correction; its Q8_0 lm_head
    (8-bit blocks: TensorRT int8 has none) is refused by name, nothing written, until an override
    keeps it at its dequantised values."""
    gguf = {"scheme": "gguf", "file": str(SMOLLM2_GGUF)}
    with pytest.raises(KilnError, match=r"1 GGUF tensors have grids TensorRT cannot hold exactly: "
                                        r"token_embd\.weight \(Q8_0: 8-bit blocks") as e:
        trt_build(SMOLLM2_DIR, tmp_path, "g-trt", quantization=gguf)
    assert "overrides" in e.value.fix
    assert not list(tmp_path.glob("*g-trt*"))
    art = trt_build(SMOLLM2_DIR, tmp_path, "g-trt", quality={"gate": False},
                    quantization={**gguf, "overrides": [{"match": "/lm_head/*", "precision": "fp32"}]})
    notes = [n for p in json.loads((art / "kiln.json").read_text())["graph"]["passes"] for n in p["notes"]]
    assert "GGUF grids kept: Q4_1 210; 0 linears dequantised" in notes


def test_q4_0_gguf_builds_on_its_int4_grids(smollm2_q4_0, tmp_path):
    """Q4_0 is TensorRT's own form (signed int4, block 32, no correction): the engine holds int4
    weights (the fp16 engine of the same model holds 270 MB)."""
    path, imported = smollm2_q4_0
    art = trt_build(imported, tmp_path, "q40-trt", quantization={"scheme": "gguf", "file": str(path)}, quality={"gate": False})
    notes = [n for p in json.loads((art / "kiln.json").read_text())["graph"]["passes"] for n in p["notes"]]
    assert "GGUF grids kept: Q4_0 211; 0 linears dequantised" in notes
    weights = int(re.search(r"Total Weights Memory: (\d+)", (art / "build.log").read_text()).group(1))
    assert weights < 150e6  # fp16 embedding (57 MB) + int4 linears and their fp16 scales
