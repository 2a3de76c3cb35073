"""End-to-end quality on the real SmolLM2-135M (offline, `make model`): the build's quality gate
measures each engine against the fp32 engine on the 2048-token stdlib window.

Asserted: int8 weight-only within +1% and the int8-sq recipe (W8A8 on qkv and gate/up) within +1.5%
perplexity, and int4-awq at or below int4-rtn on the same grid (group 128). The issue's tighter
int4 and fp8 figures are not reached on these dequantised-Q4_1 weights; the README lists what is
measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMOLLM2_DIR, build_artifact

pytestmark = pytest.mark.skipif(not (SMOLLM2_DIR / "config.json").is_file(), reason="run `make model` first")


def quality(tmp_path, name, quantization, **limits) -> dict:
    art = build_artifact(SMOLLM2_DIR, tmp_path, name, max_seq=2048, max_batch=1, quantization=quantization,
                         quality={"window": 2048, **limits})
    return json.loads((art / "kiln.json").read_text())["quality"]


def test_int8_weight_only_within_one_percent(tmp_path):
    q = quality(tmp_path, "int8", {"scheme": "int8-wo"}, max_ppl_increase_pct=1.0)
    assert q["ppl_increase_pct"] <= 1.0 and q["top1_agreement"] >= 0.95


def test_int8_smoothquant_recipe_within_one_and_a_half_percent(tmp_path):
    """+1.14% as served on an Intel Xeon with AMX (prepacked int8 kernels; the unpacked kernels the
    gate once used gave +0.64%)."""
    recipe = yaml.safe_load((Path(__file__).parents[2] / "recipes" / "smollm2-135m-int8.yaml").read_text())
    q = quality(tmp_path, "int8-sq", recipe["quantization"], max_ppl_increase_pct=1.5)
    assert q["ppl_increase_pct"] <= 1.5 and q["top1_agreement"] >= 0.93


def test_int4_awq_beats_rtn_on_the_same_grid(tmp_path):
    rtn = quality(tmp_path, "rtn", {"scheme": "int4-rtn", "group_size": 128})
    awq = quality(tmp_path, "awq", {"scheme": "int4-awq", "group_size": 128, "calibration": {"samples": 8}})
    assert awq["perplexity"] <= rtn["perplexity"]
    assert awq["mean_kl"] < rtn["mean_kl"]
