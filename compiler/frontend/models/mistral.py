"""Mistral (`MistralForCausalLM`): the Llama decoder with an optional sliding attention window."""

from __future__ import annotations

from compiler.frontend.config_fields import integer
from compiler.frontend.models.llama import IGNORED_WEIGHTS, SHARDS, LlamaConfig, build  # noqa: F401  (the shared builder)

ARCH = "MistralForCausalLM"


def config(cfg: dict) -> LlamaConfig:
    window = integer(cfg, "sliding_window", f"config.json of {ARCH}") if cfg.get("sliding_window") else None
    return LlamaConfig.from_hf(cfg, ARCH, sliding_window=window)
