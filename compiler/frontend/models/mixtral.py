"""Mixtral (`MixtralForCausalLM`): the shared decoder with a top-k routed MoE in every layer
(experts w1 = gate, w3 = up, w2 = down; top-k probabilities always renormalised) and the
Mistral sliding window when the config sets one."""

from __future__ import annotations

from compiler.frontend.config_fields import integer
from compiler.frontend.models.architecture import Architecture
from compiler.frontend.models.decoder import IGNORED_WEIGHTS, SHARDS, DecoderConfig, build
from compiler.frontend.moe import MoeConfig

ARCH = "MixtralForCausalLM"
WHERE = f"config.json of {ARCH}"


def config(cfg: dict) -> DecoderConfig:
    experts = integer(cfg, "num_local_experts", WHERE)
    moe = MoeConfig(
        num_experts=experts,
        top_k=integer(cfg, "num_experts_per_tok", WHERE, hi=experts),
        expert_size=integer(cfg, "intermediate_size", WHERE),
        normalize=True,
        router="model.layers.{i}.block_sparse_moe.gate.weight",
        expert="model.layers.{i}.block_sparse_moe.experts.{e}.{p}.weight",
        projections=("w1", "w3", "w2"),
    )
    window = integer(cfg, "sliding_window", WHERE, default=None) if cfg.get("sliding_window") else None
    return DecoderConfig.from_hf(cfg, ARCH, sliding_window=window, moe=moe)


ARCHITECTURE = Architecture(ARCH, config, build, ignored_weights=IGNORED_WEIGHTS, shards=SHARDS)
