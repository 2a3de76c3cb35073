"""Structured pruning by calibration statistics, before the graph is built: FFN channels,
attention heads and whole layers.

All three read one calibration run over the unpruned graph (passes/quant/calibration.py, the
collection AWQ uses), then the graph is built from a pruned view of the checkpoint
(frontend/checkpoint.py: PrunedCheckpoint) as from any checkpoint, so every shape agrees by
construction.

- FFN channel j of layer i (gate/up rows j, down column j) adds a_j * W_down[:, j] to the
  residual; its importance is mean |a_j| x ||W_down[:, j]||. Every layer keeps the same number
  of channels (a multiple of 8: one intermediate_size, vector-friendly products), in order.
- Query head h adds o_h W_o[:, hD:(h+1)D]; its importance sums that product over the head's D
  channels of o_proj's input. With grouped KV every group keeps the same number of query heads
  (so heads still map onto their KV head); without (one query per KV head) whole heads go,
  keys and values too, and the KV cache shrinks with them.
- Layer i's block influence is the mean angle between the residual stream entering and leaving
  it, arccos(cos(x_in, x_out)) / pi over the calibration rows: the layers that turn it least
  are removed and the rest renumbered.

    view, record = prune_checkpoint(options, arch, ckpt, progress)   # a pruned Checkpoint view

The record (what was removed; layer keys are the pruned model's indices) goes into kiln.json
and the engine card, and the build's quality gate scores the result against the unpruned fp32
model.
"""

from __future__ import annotations

import re

import numpy as np

from compiler.errors import KilnError
from compiler.passes.quant.calibration import VALUE, CalibrationConfig, calibration_tokens, collect

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")  # a decoder layer's weight: index, name within the layer
FFN_ROWS = ("mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias")
FFN_COLS = ("mlp.down_proj.weight",)
Q_ROWS = ("self_attn.q_proj.weight", "self_attn.q_proj.bias")
KV_ROWS = ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias")
O_COLS = ("self_attn.o_proj.weight",)
ALIGN = 8


def prune_checkpoint(options, arch, ckpt, progress: bool = True):
    """(the pruned view of ckpt, its kiln.json record) for a recipe's `prune:` options; (ckpt, None)
    when the options remove nothing."""
    cfg = arch.config(ckpt.config)
    L = cfg.num_layers
    width = _ffn_width(options.ffn_channels, ckpt, cfg) if options.ffn_channels else None
    per_group = _heads_per_group(options.heads, ckpt, cfg) if options.heads else None
    if options.layers:
        _check_layers(options.layers, ckpt, cfg)
    if width is None and per_group is None and not options.layers:
        return ckpt, None
    stats = _calibrate(options, arch, cfg, ckpt, width is not None, per_group is not None, progress)
    record = {"importance": options.importance, "calibration": options.calibration.model_dump(mode="json")}
    removed = _removed_layers(options.layers, stats, L, record)
    kept = [i for i in range(L) if i not in removed]
    new = {old: k for k, old in enumerate(kept)}
    sources = {_renamed(n, new): n for n in ckpt.names() if _renamed(n, new) is not None}
    slices: dict[str, tuple[int, np.ndarray]] = {}
    config = {**ckpt.config, **_layer_config(ckpt.config, kept)}
    if width is not None:
        config["intermediate_size"] = width
        record.update(ffn_channels=options.ffn_channels, intermediate_size=[cfg.intermediate_size, width],
                      removed_channels=_cut_channels(_ffn_scores(stats, ckpt, kept), width, kept, sources, slices))
    if per_group is not None:
        config.update(_head_config(cfg, per_group))
        record.update(heads=options.heads, num_heads=[cfg.num_heads, config["num_attention_heads"]],
                      num_kv_heads=[cfg.num_kv_heads, config["num_key_value_heads"]],
                      removed_heads=_cut_heads(stats, ckpt, cfg, per_group, kept, sources, slices))
    return ckpt.pruned(config, slices, sources), record


def _ffn_width(fraction: float, ckpt, cfg) -> int | None:
    """The FFN width every layer keeps; None when that removes nothing. Refuses a model without
    separate gate/up/down projections in every layer, by name."""
    if getattr(cfg, "moe", None) is not None:
        raise KilnError("prune.ffn_channels: this model's FFNs are mixtures of experts; kiln prunes dense FFNs",
                        "remove prune.ffn_channels for this model")
    need = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
    _require(ckpt, cfg, need, "prune.ffn_channels needs separate mlp.gate_proj, mlp.up_proj and mlp.down_proj weights",
             "remove prune.ffn_channels for this model")
    I = cfg.intermediate_size
    keep = max(ALIGN, int(round(I * (1 - fraction) / ALIGN)) * ALIGN)
    return keep if keep < I else None


def _heads_per_group(fraction: float, ckpt, cfg) -> int | None:
    """Query heads each KV group keeps (with one query per KV head: heads kept in all); None
    when that removes nothing."""
    _require(ckpt, cfg, ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                         "self_attn.o_proj.weight"),
             "prune.heads needs separate self_attn.q_proj, k_proj, v_proj and o_proj weights", "remove prune.heads for this model")
    group = cfg.num_heads // cfg.num_kv_heads
    units = group if group > 1 else cfg.num_heads  # what can go: queries within a group, or whole heads
    keep = max(1, int(round(units * (1 - fraction))))
    if keep == 1 and units * (1 - fraction) < 0.5:
        raise KilnError(f"prune.heads {fraction} would remove every query head of a KV group ({units} per group)",
                        f"set prune.heads below {1 - 0.5 / units:.2f}")
    return keep if keep < units else None


def _check_layers(n: int, ckpt, cfg) -> None:
    if n >= cfg.num_layers:
        raise KilnError(f"prune.layers {n} would remove all {cfg.num_layers} layers of this model",
                        f"set prune.layers below {cfg.num_layers}")
    if int(ckpt.config.get("decoder_sparse_step", 1) or 1) > 1:
        raise KilnError("prune.layers: this model places its experts by layer index (decoder_sparse_step > 1)",
                        "remove prune.layers for this model")
    _require(ckpt, cfg, (), "prune.layers needs decoder layers named model.layers.<i>", "remove prune.layers for this model")


def _require(ckpt, cfg, names: tuple[str, ...], problem: str, fix: str) -> None:
    """Every layer i has model.layers.<i>.<name> for each name (and some weight at all)."""
    have: dict[int, set[str]] = {}
    for full in ckpt.names():
        m = LAYER.match(full)
        if m:
            have.setdefault(int(m.group(1)), set()).add(m.group(2))
    if sorted(have) != list(range(cfg.num_layers)) or any(not set(names) <= have[i] for i in have):
        raise KilnError(f"{problem} in every layer, which this checkpoint does not have", fix)


def _calibrate(options, arch, cfg, ckpt, ffn: bool, heads: bool, progress: bool) -> dict[tuple[str, int], object]:
    """(kind, layer) -> ActStats of the unpruned graph: "ffn" down_proj's input, "heads" o_proj's
    input, "in"/"out" the residual stream entering and leaving the layer."""
    cal = options.calibration
    tokens = calibration_tokens(ckpt.root / "tokenizer.json", CalibrationConfig(cal.source, cal.samples, cal.seq_len))
    graph = arch.build(cfg, ckpt, cal.seq_len)
    nodes = {n.name: n for n in graph.graph}

    def node(name: str):
        if name not in nodes:
            raise KilnError(f"prune: the graph has no node {name} to calibrate", "remove prune from the recipe for this model")
        return nodes[name]

    targets: dict[tuple[str, int], str] = {}
    for i in range(cfg.num_layers):
        if ffn:
            targets["ffn", i] = node(f"/layers.{i}/mlp/down_proj/MatMul").name
        if heads:
            targets["heads", i] = node(f"/layers.{i}/attn/o_proj/MatMul").name
        if options.layers:
            targets["in", i] = VALUE + node(f"/layers.{i}/attn_residual").inputs[0].name
            targets["out", i] = VALUE + node(f"/layers.{i}/mlp_residual").outputs[0].name
    stats = collect(graph, tokens, list(dict.fromkeys(targets.values())), progress=progress)
    return {k: stats[t] for k, t in targets.items()}


def _removed_layers(n: int, stats, L: int, record: dict) -> list[int]:
    """The n layers of least block influence (ties: the earlier layer), recorded."""
    if not n:
        return []
    influence = [_angle(stats["in", i].rows, stats["out", i].rows) for i in range(L)]
    removed = sorted(np.argsort(influence, kind="stable")[:n].tolist())
    record.update(layers=[L, L - n], removed_layers=removed, block_influence=[round(x, 6) for x in influence])
    return removed


def _angle(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over rows of arccos(cos(x_r, y_r)) / pi; x, y [R, H], the same calibration rows."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
    return float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0))) / np.pi)


def _renamed(name: str, new: dict[int, int]) -> str | None:
    """A checkpoint name under the pruned model's layer numbering; None for a removed layer's."""
    m = LAYER.match(name)
    if not m:
        return name
    i = int(m.group(1))
    return f"model.layers.{new[i]}.{m.group(2)}" if i in new else None


def _layer_config(config: dict, kept: list[int]) -> dict:
    """config.json keys that change with the layers kept: the count, per-layer lists, layer-index lists."""
    L, out = config["num_hidden_layers"], {"num_hidden_layers": len(kept)}
    if len(kept) == L:
        return out
    for key, value in config.items():
        if isinstance(value, list) and len(value) == L and key != "mlp_only_layers":
            out[key] = [value[i] for i in kept]  # layer_types, ...
    if config.get("mlp_only_layers"):
        out["mlp_only_layers"] = [k for k, i in enumerate(kept) if i in config["mlp_only_layers"]]
    return out


def _ffn_scores(stats, ckpt, kept: list[int]) -> dict[int, np.ndarray]:
    """Old layer index -> [I] channel importance."""
    return {i: stats["ffn", i].mean_abs * _col_norms(ckpt, f"model.layers.{i}.mlp.down_proj.weight") for i in kept}


def _col_norms(ckpt, name: str) -> np.ndarray:
    return np.linalg.norm(np.asarray(ckpt.read(name), dtype=np.float64), axis=0)


def _best(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest scores (ties: the earlier), in order."""
    return np.sort(np.argsort(-scores, kind="stable")[:n])


def _slice(k: int, idx: np.ndarray, rows: tuple[str, ...], cols: tuple[str, ...], sources: dict, slices: dict) -> None:
    """Keep rows idx of layer k's `rows` weights and columns idx of its `cols`, where they exist."""
    for axis, parts in ((0, rows), (1, cols)):
        for part in parts:
            if (name := f"model.layers.{k}.{part}") in sources:
                slices[name] = (axis, idx)


def _removed(keep: np.ndarray, n: int) -> list[int]:
    return sorted(set(range(n)) - set(keep.tolist()))


def _cut_channels(scores: dict[int, np.ndarray], width: int, kept: list[int], sources: dict, slices: dict) -> dict[str, list[int]]:
    """Each kept layer's `width` most important FFN channels; the removed ones by new layer index."""
    removed = {}
    for k, i in enumerate(kept):
        keep = _best(scores[i], width)
        _slice(k, keep, FFN_ROWS, FFN_COLS, sources, slices)
        removed[str(k)] = _removed(keep, len(scores[i]))
    return removed


def _cut_heads(stats, ckpt, cfg, per_group: int, kept: list[int], sources: dict, slices: dict) -> dict[str, list[int]]:
    """The per_group most important query heads of each KV group (or, with one query per KV head,
    the per_group best heads with their keys and values); the removed ones by new layer index."""
    D, nq, group = cfg.head_dim, cfg.num_heads, cfg.num_heads // cfg.num_kv_heads
    removed = {}
    for k, i in enumerate(kept):
        channel = stats["heads", i].mean_abs * _col_norms(ckpt, f"model.layers.{i}.self_attn.o_proj.weight")  # [nq*D]
        head = channel.reshape(nq, D).sum(1)  # [nq]
        if group == 1:
            keep = _best(head, per_group)
        else:
            keep = np.concatenate([g * group + _best(head[g * group:(g + 1) * group], per_group) for g in range(cfg.num_kv_heads)])
        idx = (keep[:, None] * D + np.arange(D)).reshape(-1)  # [kept heads * D] rows of q (k, v), columns of o
        _slice(k, idx, Q_ROWS + (KV_ROWS if group == 1 else ()), O_COLS, sources, slices)
        removed[str(k)] = _removed(keep, nq)
    return removed


def _head_config(cfg, per_group: int) -> dict:
    group = cfg.num_heads // cfg.num_kv_heads
    heads = per_group * cfg.num_kv_heads if group > 1 else per_group
    kv = cfg.num_kv_heads if group > 1 else per_group
    return {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": cfg.head_dim}
