"""Qwen3 (`Qwen3ForCausalLM`): the shared decoder with an RMSNorm on each q and k head (before
rotary) and an explicit head_dim. No qkv bias. Sliding windows are refused, as for Qwen2."""

from __future__ import annotations

from compiler.frontend.config_fields import flag, refuse_sliding_window
from compiler.frontend.models.architecture import Architecture
from compiler.frontend.models.decoder import IGNORED_WEIGHTS, SHARDS, DecoderConfig, build

ARCH = "Qwen3ForCausalLM"


def config(cfg: dict) -> DecoderConfig:
    refuse_sliding_window(cfg, f"config.json of {ARCH}")
    return DecoderConfig.from_hf(cfg, ARCH, qk_norm=True, attention_bias=flag(cfg, "attention_bias", f"config.json of {ARCH}", False))


ARCHITECTURE = Architecture(ARCH, config, build, ignored_weights=IGNORED_WEIGHTS, shards=SHARDS)
