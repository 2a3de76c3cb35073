"""Qwen3 (`Qwen3ForCausalLM`): the Llama decoder with an RMSNorm on each q and k head (before
rotary) and an explicit head_dim. No qkv bias. Sliding windows are refused, as for Qwen2."""

from __future__ import annotations

from compiler.errors import KilnError
from compiler.frontend.config_fields import flag
from compiler.frontend.models.llama import IGNORED_WEIGHTS, SHARDS, LlamaConfig, build  # noqa: F401  (the shared builder)

ARCH = "Qwen3ForCausalLM"


def config(cfg: dict) -> LlamaConfig:
    if cfg.get("use_sliding_window"):
        raise KilnError(f"config.json of {ARCH}: use_sliding_window=true is not supported", "set use_sliding_window to false")
    return LlamaConfig.from_hf(cfg, ARCH, qk_norm=True, attention_bias=flag(cfg, "attention_bias", f"config.json of {ARCH}", False))
