"""Mixtral (`MixtralForCausalLM`): the Llama decoder with a top-k routed MoE in every layer
(experts w1 = gate, w3 = up, w2 = down; top-k probabilities always renormalised) and the
Mistral sliding window when the config sets one."""

from __future__ import annotations

from compiler.frontend.models.llama import SHARDS, LlamaConfig, build, need  # noqa: F401  (the shared builder)
from compiler.frontend.moe import MoeConfig

ARCH = "MixtralForCausalLM"


def config(cfg: dict) -> LlamaConfig:
    window = cfg.get("sliding_window")
    moe = MoeConfig(
        num_experts=int(need(cfg, "num_local_experts", ARCH)),
        top_k=int(need(cfg, "num_experts_per_tok", ARCH)),
        expert_size=int(need(cfg, "intermediate_size", ARCH)),
        normalize=True,
        router="model.layers.{i}.block_sparse_moe.gate.weight",
        expert="model.layers.{i}.block_sparse_moe.experts.{e}.{p}.weight",
        projections=("w1", "w3", "w2"),
    )
    return LlamaConfig.from_hf(cfg, ARCH, sliding_window=int(window) if window else None, moe=moe)
