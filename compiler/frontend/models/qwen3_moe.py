"""Qwen3-MoE (`Qwen3MoeForCausalLM`): the Qwen3 decoder (q/k head norms) with top-k routed experts
in the layers `decoder_sparse_step` selects, minus `mlp_only_layers` (those keep a dense MLP of
`intermediate_size`); top-k probabilities renormalised when `norm_topk_prob` is set."""

from __future__ import annotations

from compiler.errors import KilnError
from compiler.frontend.models.llama import SHARDS, LlamaConfig, build, need  # noqa: F401  (the shared builder)
from compiler.frontend.moe import MoeConfig

ARCH = "Qwen3MoeForCausalLM"


def config(cfg: dict) -> LlamaConfig:
    if cfg.get("use_sliding_window"):
        raise KilnError(f"config.json of {ARCH}: use_sliding_window=true is not supported", "set use_sliding_window to false")
    layers, step = int(need(cfg, "num_hidden_layers", ARCH)), int(cfg.get("decoder_sparse_step", 1))
    dense = set(int(i) for i in cfg.get("mlp_only_layers") or [])
    dense |= {i for i in range(layers) if step <= 0 or (i + 1) % step}
    moe = MoeConfig(
        # transformers 5 writes num_local_experts; checkpoints made with 4.x name it num_experts
        num_experts=int(cfg["num_experts"] if cfg.get("num_experts") else need(cfg, "num_local_experts", ARCH)),
        top_k=int(need(cfg, "num_experts_per_tok", ARCH)),
        expert_size=int(need(cfg, "moe_intermediate_size", ARCH)),
        normalize=bool(need(cfg, "norm_topk_prob", ARCH)),
        router="model.layers.{i}.mlp.gate.weight",
        expert="model.layers.{i}.mlp.experts.{e}.{p}.weight",
        projections=("gate_proj", "up_proj", "down_proj"),
        dense_layers=frozenset(dense),
    )
    return LlamaConfig.from_hf(cfg, ARCH, qk_norm=True, moe=moe)
