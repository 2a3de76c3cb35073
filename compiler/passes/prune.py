"""Structured pruning of FFN channels by calibration importance, before the graph is built.

Channel j of layer i's gated FFN (gate/up rows j, down column j) contributes a_j * W_down[:, j]
to the residual, a_j being the activation entering down_proj; its importance is
mean |a_j| x ||W_down[:, j]|| over the calibration set (the same collection AWQ uses:
passes/quant/calibration.py, on the unpruned graph). Each layer keeps its most important
channels, the same count in every layer (a multiple of 8, so the config stays one
intermediate_size and the products stay vector-friendly), in their original order.

    view, record = prune_checkpoint(options, arch, ckpt, progress)   # a pruned Checkpoint view

The graph is then built from the view (frontend/checkpoint.py: PrunedCheckpoint) as from any
checkpoint, so every shape agrees by construction; the record (what was removed, per layer)
goes into kiln.json and the engine card, and the build's quality gate scores the result against
the unpruned fp32 model.
"""

from __future__ import annotations

import re

import numpy as np

from compiler.errors import KilnError
from compiler.passes.quant.calibration import CalibrationConfig, calibration_tokens, collect

FFN = {"gate": r"(.*\.layers\.(\d+)\.mlp\.gate_proj)\.(weight|bias)$", "up": r"(.*\.layers\.(\d+)\.mlp\.up_proj)\.(weight|bias)$",
       "down": r"(.*\.layers\.(\d+)\.mlp\.down_proj)\.weight$"}
ALIGN = 8


def prune_checkpoint(options, arch, ckpt, progress: bool = True):
    """(the pruned view of ckpt, its kiln.json record) for a recipe's `prune:` options."""
    cfg = arch.config(ckpt.config)
    layers, I = _ffn_layout(ckpt, cfg)
    keep_n = max(ALIGN, int(round(I * (1 - options.ffn_channels) / ALIGN)) * ALIGN)
    if keep_n >= I:
        return ckpt, None
    scores = _importance(options, arch, cfg, ckpt, layers, progress)  # [L, I]
    slices, removed = {}, {}
    for i, names in layers.items():
        keep = np.sort(np.argsort(-scores[i], kind="stable")[:keep_n])
        for name in names["rows"]:
            slices[name] = (0, keep)
        slices[names["down"]] = (1, keep)
        removed[str(i)] = sorted(set(range(I)) - set(keep.tolist()))
    config = {**ckpt.config, "intermediate_size": keep_n}
    record = {"ffn_channels": options.ffn_channels, "importance": options.importance,
              "intermediate_size": [I, keep_n], "calibration": options.calibration.model_dump(mode="json"),
              "removed_channels": removed}
    return ckpt.pruned(config, slices), record


def _ffn_layout(ckpt, cfg) -> tuple[dict[int, dict], int]:
    """Per layer: the gate/up weights (and biases) whose rows, and the down weight whose columns,
    are channels; and the FFN width. Refuses a model without that layout, by name."""
    if getattr(cfg, "moe", None) is not None:
        raise KilnError("prune.ffn_channels: this model's FFNs are mixtures of experts; kiln prunes dense FFNs",
                        "remove prune.ffn_channels for this model")
    layers: dict[int, dict] = {}
    for name in ckpt.names():
        for part, pattern in FFN.items():
            m = re.match(pattern, name)
            if m:
                entry = layers.setdefault(int(m.group(2)), {"rows": [], "down": None})
                if part == "down":
                    entry["down"] = name
                else:
                    entry["rows"].append(name)
    I = getattr(cfg, "intermediate_size", None)
    count = getattr(cfg, "num_layers", None)
    if not layers or len(layers) != count or any(e["down"] is None or len(e["rows"]) < 2 for e in layers.values()):
        raise KilnError("prune.ffn_channels needs separate mlp.gate_proj, mlp.up_proj and mlp.down_proj weights in "
                        "every layer, which this checkpoint does not have", "remove prune.ffn_channels for this model")
    return layers, I


def _importance(options, arch, cfg, ckpt, layers: dict[int, dict], progress: bool) -> np.ndarray:
    cal = options.calibration
    tokens = calibration_tokens(ckpt.root / "tokenizer.json", CalibrationConfig(cal.source, cal.samples, cal.seq_len))
    graph = arch.build(cfg, ckpt, cal.seq_len)
    targets = {i: f"/layers.{i}/mlp/down_proj/MatMul" for i in layers}
    names = {n.name for n in graph.graph}
    missing = [t for t in targets.values() if t not in names]
    if missing:
        raise KilnError(f"prune.ffn_channels: the graph has no node {missing[0]} to calibrate",
                        "remove prune.ffn_channels for this model")
    stats = collect(graph, tokens, list(targets.values()), progress=progress)
    out = np.zeros((len(layers), cfg.intermediate_size))
    for i, t in targets.items():
        w_norm = np.linalg.norm(np.asarray(ckpt.read(layers[i]["down"]), dtype=np.float64), axis=0)  # [I]
        out[i] = stats[t].mean_abs * w_norm
    return out
