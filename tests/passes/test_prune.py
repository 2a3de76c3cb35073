"""Structured FFN-channel pruning: the pruned engine equals transformers on the same model with the
same channels cut out (every shape consistent), channels that contribute nothing are the ones
removed, kiln.json and the card record it, the quality gate fails a recipe whose pruning
exceeds its limit, and what is not implemented is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from compiler.cli import main
from compiler.runtime import load
from tests.conftest import build_artifact, make_tiny

CAL = {"samples": 2, "seq_len": 64}
IDS = [[5, 17, 42, 99, 3, 250, 77, 8, 130, 61]]
LOOSE = {"window": 128, "max_ppl_increase_pct": 10000}


def logits_of(artifact) -> np.ndarray:
    s = load(artifact).session
    T = len(IDS[0])
    return s.step(s.binding(s.new_cache(1)), np.array(IDS), np.arange(T)[None], np.arange(T)[None])[0]


def cut_in_torch(base, removed: dict[str, list[int]]) -> np.ndarray:
    """transformers' logits with the recorded channels removed by hand."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            mlp = layer.mlp
            keep = torch.tensor(sorted(set(range(mlp.down_proj.in_features)) - set(removed[str(i)])))
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight = torch.nn.Parameter(lin.weight[keep].clone())
            mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, keep].clone())
        return model(torch.tensor(IDS)).logits[0].numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_pruned_engine_is_the_model_with_those_channels_cut(tmp_path, arch):
    base = make_tiny(arch, tmp_path / "base")
    art = build_artifact(base, tmp_path, "p", prune={"ffn_channels": 0.5, "calibration": CAL}, quality=LOOSE)
    m = json.loads((art / "kiln.json").read_text())
    p = m["pruned"]
    assert p["intermediate_size"] == [160, 80] and all(len(v) == 80 for v in p["removed_channels"].values())
    assert np.abs(logits_of(art) - cut_in_torch(base, p["removed_channels"])).max() < 1e-4
    assert "ppl_increase_pct" in m["quality"] and "- pruned: 50% of each layer's FFN channels" in (art / "README.md").read_text()


def test_channels_that_contribute_nothing_are_the_ones_removed(tmp_path):
    from safetensors.numpy import load_file, save_file

    base = make_tiny("llama", tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    dead = {0: [3, 50, 51, 120], 1: [0, 7, 159]}
    for i, cols in dead.items():
        weights[f"model.layers.{i}.mlp.down_proj.weight"][:, cols] = 0.0
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    art = build_artifact(base, tmp_path, "p", prune={"ffn_channels": 0.05, "calibration": CAL}, quality=LOOSE)
    removed = json.loads((art / "kiln.json").read_text())["pruned"]["removed_channels"]
    for i, cols in dead.items():
        assert set(cols) <= set(removed[str(i)]), (i, removed[str(i)])


def _build(tmp_path, base, capsys, **fields) -> tuple[int, str]:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"schema": 1, "name": "p", "source": str(base), "max_seq": 256, **fields}))
    capsys.readouterr()
    rc = main(["build", str(path), "--out", str(tmp_path / "art"), "--quiet"])
    return rc, capsys.readouterr().err.strip()


def test_the_gate_fails_pruning_past_its_limit(tmp_path, capsys):
    base = make_tiny("llama", tmp_path / "base")
    rc, err = _build(tmp_path, base, capsys, prune={"ffn_channels": 0.9, "calibration": CAL},
                     quality={"window": 128, "max_ppl_increase_pct": 0.0001})
    assert rc == 2 and "quality limit violated" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "art" / "p").exists()


@pytest.mark.parametrize("arch,prune,says", [
    ("llama", {"layers": 2}, "prune.layers is not implemented"),
    ("llama", {"heads": 0.25}, "prune.heads is not implemented"),
    ("llama", {"ffn_channels": 1.0}, "prune.ffn_channels"),
    ("mixtral", {"ffn_channels": 0.25, "calibration": CAL}, "mixtures of experts"),
])
def test_what_is_not_implemented_is_refused_by_name(tmp_path, capsys, arch, prune, says):
    rc, err = _build(tmp_path, make_tiny(arch, tmp_path / "base"), capsys, prune=prune)
    assert rc == 2 and says in err and len(err.splitlines()) == 1, err
