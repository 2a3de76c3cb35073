"""Qwen2 (`Qwen2ForCausalLM`): the shared decoder with q/k/v biases.

Qwen2 declares `use_sliding_window` (off in every released checkpoint); a config that turns it
on is refused rather than built with full attention, since its per-layer rule
(`max_window_layers`) is not implemented.
"""

from __future__ import annotations

from compiler.frontend.config_fields import refuse_sliding_window
from compiler.frontend.models.architecture import Architecture
from compiler.frontend.models.decoder import IGNORED_WEIGHTS, SHARDS, DecoderConfig, build

ARCH = "Qwen2ForCausalLM"


def config(cfg: dict) -> DecoderConfig:
    refuse_sliding_window(cfg, f"config.json of {ARCH}")
    return DecoderConfig.from_hf(cfg, ARCH, attention_bias=True)


ARCHITECTURE = Architecture(ARCH, config, build, ignored_weights=IGNORED_WEIGHTS, shards=SHARDS)
