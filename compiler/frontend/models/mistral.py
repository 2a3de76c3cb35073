"""Mistral (`MistralForCausalLM`): the shared decoder with an optional sliding attention window."""

from __future__ import annotations

from compiler.frontend.config_fields import integer
from compiler.frontend.models.architecture import Architecture
from compiler.frontend.models.decoder import IGNORED_WEIGHTS, SHARDS, DecoderConfig, build

ARCH = "MistralForCausalLM"


def config(cfg: dict) -> DecoderConfig:
    window = integer(cfg, "sliding_window", f"config.json of {ARCH}") if cfg.get("sliding_window") else None
    return DecoderConfig.from_hf(cfg, ARCH, sliding_window=window)


ARCHITECTURE = Architecture(ARCH, config, build, ignored_weights=IGNORED_WEIGHTS, shards=SHARDS)
