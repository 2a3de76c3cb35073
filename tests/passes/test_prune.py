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


def cut_in_torch(base, pruned: dict) -> np.ndarray:
    """transformers' logits of the model with the recorded layers, heads and channels cut out by hand."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    cfg, D = model.config, model.config.head_dim
    gone = set(pruned.get("removed_layers", []))
    state, L = {}, cfg.num_hidden_layers
    for name, w in model.state_dict().items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            if int(parts[2]) in gone:
                continue
            parts[2] = str(sorted(set(range(L)) - gone).index(int(parts[2])))
        state[".".join(parts)] = w
    for i in range(L - len(gone)):
        p = f"model.layers.{i}."
        ch = pruned.get("removed_channels", {}).get(str(i), [])
        keep = torch.tensor(sorted(set(range(cfg.intermediate_size)) - set(ch)))
        for w in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            state[p + w] = state[p + w][keep]
        state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, keep]
        heads = sorted(set(range(cfg.num_attention_heads)) - set(pruned.get("removed_heads", {}).get(str(i), [])))
        rows = torch.tensor([h * D + d for h in heads for d in range(D)])
        state[p + "self_attn.q_proj.weight"] = state[p + "self_attn.q_proj.weight"][rows]
        state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, rows]
        if pruned.get("num_kv_heads", [0, 0])[0] != pruned.get("num_kv_heads", [0, 0])[1]:  # whole heads went
            for w in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
                state[p + w] = state[p + w][rows]
    cfg.num_hidden_layers, cfg.head_dim = L - len(gone), D
    cfg.intermediate_size = pruned.get("intermediate_size", [0, cfg.intermediate_size])[1]
    cfg.num_attention_heads = pruned.get("num_heads", [0, cfg.num_attention_heads])[1]
    cfg.num_key_value_heads = pruned.get("num_kv_heads", [0, cfg.num_key_value_heads])[1]
    if "layer_types" in cfg.to_dict() and cfg.layer_types:
        cfg.layer_types = [t for j, t in enumerate(cfg.layer_types) if j not in gone]
    cut = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    cut.load_state_dict(state)
    with torch.no_grad():
        return cut(torch.tensor(IDS)).logits[0].numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_pruned_engine_is_the_model_with_those_channels_cut(tmp_path, arch):
    base = make_tiny(arch, tmp_path / "base")
    art = build_artifact(base, tmp_path, "p", prune={"ffn_channels": 0.5, "calibration": CAL}, quality=LOOSE)
    m = json.loads((art / "kiln.json").read_text())
    p = m["pruned"]
    assert p["intermediate_size"] == [160, 80] and all(len(v) == 80 for v in p["removed_channels"].values())
    assert np.abs(logits_of(art) - cut_in_torch(base, p)).max() < 1e-4
    assert "ppl_increase_pct" in m["quality"] and "- pruned: 50% of each layer's FFN channels" in (art / "README.md").read_text()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_removed_layers_and_channels_equal_the_model_without_them(tmp_path, arch):
    base = make_tiny(arch, tmp_path / "base", num_hidden_layers=4)
    art = build_artifact(base, tmp_path, "p", prune={"layers": 2, "ffn_channels": 0.25, "calibration": CAL}, quality=LOOSE)
    p = json.loads((art / "kiln.json").read_text())["pruned"]
    assert p["layers"] == [4, 2] and len(p["removed_layers"]) == 2 and len(p["block_influence"]) == 4
    assert sorted(p["removed_layers"]) == sorted(np.argsort(p["block_influence"], kind="stable")[:2].tolist())
    got = logits_of(art)
    assert np.abs(got - cut_in_torch(base, p)).max() < 1e-4
    assert json.loads((art / "engine.json").read_text())["kv_cache"]["num_layers"] == 2


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen3", 2), ("llama", 4)])
def test_removed_heads_equal_the_model_without_them(tmp_path, arch, kv):
    base = make_tiny(arch, tmp_path / "base", num_key_value_heads=kv)
    art = build_artifact(base, tmp_path, "p", prune={"heads": 0.5, "calibration": CAL}, quality=LOOSE)
    p = json.loads((art / "kiln.json").read_text())["pruned"]
    assert p["num_heads"] == [4, 2] and p["num_kv_heads"] == [kv, 2] and all(len(h) == 2 for h in p["removed_heads"].values())
    if kv == 2:  # grouped KV: one query head of each group stays
        assert all(len({h // 2 for h in set(range(4)) - set(r)}) == 2 for r in p["removed_heads"].values())
    assert np.abs(logits_of(art) - cut_in_torch(base, p)).max() < 1e-4
    assert json.loads((art / "engine.json").read_text())["kv_cache"]["num_kv_heads"] == 2
    assert "query heads 4 -> 2" in (art / "README.md").read_text()


def test_a_layer_that_changes_nothing_is_the_one_removed(tmp_path):
    from safetensors.numpy import load_file, save_file

    base = make_tiny("llama", tmp_path / "base", num_hidden_layers=4)
    weights = load_file(base / "model.safetensors")
    for w in ("self_attn.o_proj", "mlp.down_proj"):  # layer 2 adds zero to the residual stream
        weights[f"model.layers.2.{w}.weight"][:] = 0.0
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    art = build_artifact(base, tmp_path, "p", prune={"layers": 1, "calibration": CAL}, quality=LOOSE)
    p = json.loads((art / "kiln.json").read_text())["pruned"]
    assert p["removed_layers"] == [2] and p["block_influence"][2] < 1e-6 and "removed_channels" not in p


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
    ("llama", {"layers": 2}, "would remove all 2 layers"),
    ("phi3", {"heads": 0.25}, "prune.heads needs separate self_attn.q_proj"),
    ("llama", {"heads": 0.9}, "would remove every query head of a KV group"),
    ("qwen3_moe_step2", {"layers": 1, "calibration": CAL}, "places its experts by layer index"),
    ("llama", {"ffn_channels": 1.0}, "prune.ffn_channels"),
    ("mixtral", {"ffn_channels": 0.25, "calibration": CAL}, "mixtures of experts"),
])
def test_what_is_not_implemented_is_refused_by_name(tmp_path, capsys, arch, prune, says):
    extra = {"decoder_sparse_step": 2} if arch.endswith("_step2") else {}
    rc, err = _build(tmp_path, make_tiny(arch.removesuffix("_step2"), tmp_path / "base", **extra), capsys, prune=prune)
    assert rc == 2 and says in err and len(err.splitlines()) == 1, err
