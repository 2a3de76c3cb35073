"""Qwen3-MoE (`Qwen3MoeForCausalLM`): the Qwen3 decoder (q/k head norms) with top-k routed experts
in the layers `decoder_sparse_step` selects, minus `mlp_only_layers` (those keep a dense MLP of
`intermediate_size`); top-k probabilities renormalised when `norm_topk_prob` is set."""

from __future__ import annotations

from compiler.errors import KilnError
from compiler.frontend.config_fields import flag, integer, need, refuse_sliding_window
from compiler.frontend.models.architecture import Architecture
from compiler.frontend.models.decoder import IGNORED_WEIGHTS, SHARDS, DecoderConfig, build
from compiler.frontend.moe import MoeConfig

ARCH = "Qwen3MoeForCausalLM"
WHERE = f"config.json of {ARCH}"


def config(cfg: dict) -> DecoderConfig:
    refuse_sliding_window(cfg, WHERE)
    layers, step = integer(cfg, "num_hidden_layers", WHERE), integer(cfg, "decoder_sparse_step", WHERE, default=1)
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in only):
        raise KilnError(f"{WHERE}: mlp_only_layers={only!r} must list layer indices 0..{layers - 1}", "fix mlp_only_layers")
    dense = set(only) | {i for i in range(layers) if step <= 0 or (i + 1) % step}
    # transformers 5 writes num_local_experts; checkpoints made with 4.x name it num_experts
    experts = integer(cfg, "num_experts" if cfg.get("num_experts") else "num_local_experts", WHERE)
    need(cfg, "norm_topk_prob", WHERE)
    moe = MoeConfig(
        num_experts=experts,
        top_k=integer(cfg, "num_experts_per_tok", WHERE, hi=experts),
        expert_size=integer(cfg, "moe_intermediate_size", WHERE),
        normalize=flag(cfg, "norm_topk_prob", WHERE, False),
        router="model.layers.{i}.mlp.gate.weight",
        expert="model.layers.{i}.mlp.experts.{e}.{p}.weight",
        projections=("gate_proj", "up_proj", "down_proj"),
        dense_layers=frozenset(dense),
    )
    return DecoderConfig.from_hf(cfg, ARCH, qk_norm=True, moe=moe)


ARCHITECTURE = Architecture(ARCH, config, build, ignored_weights=IGNORED_WEIGHTS, shards=SHARDS)
