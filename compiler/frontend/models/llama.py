"""Llama (`LlamaForCausalLM`): SmolLM2, Llama 2 and Llama 3.x (incl. `llama3` rope scaling).

The shared decoder (compiler/frontend/models/decoder.py) with its default weight names."""

from __future__ import annotations

from compiler.frontend.models import decoder
from compiler.frontend.models.architecture import Architecture

ARCH = "LlamaForCausalLM"


def config(cfg: dict) -> decoder.DecoderConfig:
    return decoder.DecoderConfig.from_hf(cfg, ARCH)


ARCHITECTURE = Architecture(ARCH, config, decoder.build, ignored_weights=decoder.IGNORED_WEIGHTS, shards=decoder.SHARDS)
