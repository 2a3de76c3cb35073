"""LoRA adapters merged at build: logits equal peft's own merge (merge_and_unload) on the same tiny
Llama and Qwen3 checkpoints, for one adapter, rsLoRA with a per-module rank, and two adapters in
order; kiln.json and the card record them; a changed adapter rebuilds; bad adapters are refused
by name in one line, exit 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from compiler.cli import main
from compiler.runtime import load
from tests.conftest import build_artifact, make_tiny

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [[5, 17, 42, 99, 3, 250, 77, 8, 130, 61, 200, 12]]


def make_adapter(base, out, seed: int, **config):
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **config})
    peft.get_peft_model(model, cfg).save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
    return out


def peft_logits(base, adapters) -> np.ndarray:
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    for path in adapters:
        model = peft.PeftModel.from_pretrained(model, path).merge_and_unload()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0].numpy()  # [T, V]


def kiln_logits(artifact) -> np.ndarray:
    s = load(artifact).session
    T = len(IDS[0])
    return s.step(s.binding(s.new_cache(1)), np.array(IDS), np.arange(T)[None], np.arange(T)[None])[0]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def base(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return make_tiny(request.param, root / "base")


@pytest.mark.parametrize("variant", ["plain", "rslora-rank-pattern", "two"])
def test_merged_logits_equal_peft_merge(base, tmp_path, variant):
    if variant == "plain":
        adapters = [make_adapter(base, tmp_path / "a", 1)]
    elif variant == "rslora-rank-pattern":
        adapters = [make_adapter(base, tmp_path / "a", 2, use_rslora=True, rank_pattern={"down_proj": 2},
                                 alpha_pattern={"q_proj": 3})]
    else:
        adapters = [make_adapter(base, tmp_path / "a", 3), make_adapter(base, tmp_path / "b", 4, target_modules=["v_proj"])]
    art = build_artifact(base, tmp_path / "out", "merged", adapters=[{"name": f"ad{i}", "path": str(p)}
                                                                  for i, p in enumerate(adapters)])
    got, want = kiln_logits(art), peft_logits(base, adapters)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    assert np.abs(kiln_logits(build_artifact(base, tmp_path / "plain", "plain")) - want).max() > 1e-2  # the adapter matters
    manifest = json.loads((art / "kiln.json").read_text())
    assert [a["name"] for a in manifest["adapters"]] == [f"ad{i}" for i in range(len(adapters))]
    assert "LoRA adapter `ad0` merged" in (art / "README.md").read_text()


def test_a_changed_adapter_rebuilds(base, tmp_path):
    ad = make_adapter(base, tmp_path / "a", 5)
    spec = [{"name": "a", "path": str(ad)}]
    first = build_artifact(base, tmp_path / "out", "m", adapters=spec)
    before = kiln_logits(first)
    make_adapter(base, tmp_path / "a2", 6)
    shutil.copy(tmp_path / "a2" / "adapter_model.safetensors", ad / "adapter_model.safetensors")
    again = build_artifact(base, tmp_path / "out", "m", adapters=spec)
    assert np.abs(kiln_logits(again) - before).max() > 1e-3


def _recipe(tmp_path, base, adapters, **extra):
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"schema": 1, "name": "bad", "source": str(base), "max_seq": 64, "adapters": adapters, **extra}))
    return p


def _broken(tmp_path, base, how: str):
    ad = make_adapter(base, tmp_path / how, 7)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    if how == "pickle":
        (ad / "adapter_model.safetensors").rename(ad / "adapter_model.bin")
    elif how == "dora":
        cfg["use_dora"] = True
    elif how == "missing-target":
        cfg["target_modules"] = TARGETS + ["lm_head"]
    elif how == "wrong-base":
        other = make_tiny("llama", tmp_path / "wide", hidden_size=96, intermediate_size=192)
        shutil.rmtree(ad)
        ad = make_adapter(other, tmp_path / how, 7)
        return ad
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return ad


@pytest.mark.parametrize("how,says", [
    ("pickle", "adapter_model.bin, which kiln never loads"),
    ("dora", "use_dora"),
    ("missing-target", "target module lm_head"),
    ("wrong-base", "do not update its weight"),
])
def test_bad_adapters_are_refused_by_name(base, tmp_path, capsys, how, says):
    recipe = _recipe(tmp_path, base, [{"name": "x", "path": str(_broken(tmp_path, base, how))}])
    capsys.readouterr()  # making the adapter printed transformers' progress
    assert main(["build", str(recipe), "--out", str(tmp_path / "art"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "adapter x" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "art" / "bad").exists()


def test_adapters_and_gguf_grids_do_not_mix(base, tmp_path, capsys):
    recipe = _recipe(tmp_path, base, [{"name": "x", "path": str(tmp_path)}], quantization={"scheme": "gguf"})
    assert main(["build", str(recipe), "--out", str(tmp_path / "art"), "--quiet"]) == 2
    assert "adapters cannot be merged into scheme gguf" in capsys.readouterr().err


def test_a_quantised_adapter_build_is_gated_against_the_merged_fp32_model(base, tmp_path):
    from compiler.build.evaluate import evaluate

    spec = [{"name": "a", "path": str(make_adapter(base, tmp_path / "a", 8))}]
    q = build_artifact(base, tmp_path / "q", "q", adapters=spec, quantization={"scheme": "int4-awq", "calibration": {
        "samples": 2, "seq_len": 64}}, quality={"window": 128, "max_ppl_increase_pct": 1000})
    fp32 = build_artifact(base, tmp_path / "f", "f", adapters=spec)
    gate = json.loads((q / "kiln.json").read_text())["quality"]
    assert gate["reference_perplexity"] == pytest.approx(evaluate(fp32, window=128, progress=False).perplexity, rel=1e-6)
