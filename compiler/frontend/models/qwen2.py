"""Qwen2 (`Qwen2ForCausalLM`): the Llama decoder with q/k/v biases.

Qwen2 declares `use_sliding_window` (off in every released checkpoint); a config that turns it
on is refused rather than built with full attention, since its per-layer rule
(`max_window_layers`) is not implemented.
"""

from __future__ import annotations

from compiler.errors import KilnError
from compiler.frontend.models.llama import IGNORED_WEIGHTS, SHARDS, LlamaConfig, build  # noqa: F401  (the shared builder)

ARCH = "Qwen2ForCausalLM"


def config(cfg: dict) -> LlamaConfig:
    if cfg.get("use_sliding_window"):
        raise KilnError(f"config.json of {ARCH}: use_sliding_window=true is not supported", "set use_sliding_window to false")
    return LlamaConfig.from_hf(cfg, ARCH, attention_bias=True)
