"""Quantization scheme gguf: SmolLM2's Q4_1 GGUF built on its own grids computes what the fp32
engine of the dequantised checkpoint computes; bad settings are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.errors import KilnError
from compiler.recipe import parse_recipe
from tests.conftest import SMOLLM2_DIR, SMOLLM2_GGUF, build_artifact

needs_smollm2 = pytest.mark.skipif(not (SMOLLM2_GGUF.is_file() and (SMOLLM2_DIR / "config.json").is_file()),
                                   reason="run `make model` first")


@needs_smollm2
def test_smollm2_on_its_gguf_grids_equals_the_dequantised_fp32_engine(tmp_path):
    from compiler.runtime import load
    from tests.backends.onnxruntime.test_parity import engine_logits

    common = {"max_seq": 256, "max_batch": 1}
    gguf = build_artifact(SMOLLM2_DIR, tmp_path, "gguf", quantization={"scheme": "gguf", "file": str(SMOLLM2_GGUF)},
                          quality={"window": 128, "max_ppl_increase_pct": 0.05, "min_top1_agreement": 0.99}, **common)
    fp32 = build_artifact(SMOLLM2_DIR, tmp_path, "fp32", **common)
    ids = np.array([np.random.default_rng(0).integers(3, 49152, 96)])
    got, want = engine_logits(load(gguf), ids), engine_logits(load(fp32), ids)
    assert np.abs(got - want).max() < 5e-4  # measured 1.3e-4 with logits up to 41: summation order only
    assert (got.argmax(-1) == want.argmax(-1)).all()
    manifest = json.loads((gguf / "kiln.json").read_text())
    notes = [n for p in manifest["graph"]["passes"] for n in p["notes"]]
    assert "GGUF grids kept: Q4_1 210; 1 linears dequantised" in notes
    assert any(n.startswith("dequantised /lm_head/MatMul (Q8_0: kept as its exact fp32 values") for n in notes)
    assert manifest["quality"]["ppl_increase_pct"] == pytest.approx(0.0, abs=0.05)
    assert json.loads((gguf / "engine.json").read_text())["session"]["config_entries"][
        "session.qdq_matmulnbits_accuracy_level"] == "0"  # fp32 activations: the default of scheme gguf


def test_gguf_needs_a_gguf_file(tmp_path, tiny_checkpoints):
    with pytest.raises(KilnError, match="scheme gguf needs a .gguf file"):
        build_artifact(tiny_checkpoints["llama"], tmp_path, "g", quantization={"scheme": "gguf"})
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path, tiny_checkpoints):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 64)
    with pytest.raises(KilnError, match="junk.gguf is not a readable GGUF file"):
        build_artifact(tiny_checkpoints["llama"], tmp_path / "out", "g", quantization={"scheme": "gguf", "file": str(junk)})


def test_gguf_settings_are_checked_in_the_recipe():
    base = {"schema": 1, "name": "g", "source": "m.gguf", "quantization": {"scheme": "gguf"}}
    assert parse_recipe(base).onnxruntime.int4_accuracy_level == 0
    assert parse_recipe({**base, "onnxruntime": {"int4_accuracy_level": 4}}).onnxruntime.int4_accuracy_level == 4
    with pytest.raises(KilnError, match="gguf builds for backend onnxruntime"):
        parse_recipe({**base, "backend": "tensorrt"})
