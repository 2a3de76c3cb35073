"""Mistral (`MistralForCausalLM`): the Llama decoder with an optional sliding attention window."""

from __future__ import annotations

from compiler.frontend.models.llama import SHARDS, LlamaConfig, build  # noqa: F401  (the shared builder)

ARCH = "MistralForCausalLM"


def config(cfg: dict) -> LlamaConfig:
    window = cfg.get("sliding_window")
    return LlamaConfig.from_hf(cfg, ARCH, sliding_window=int(window) if window else None)
