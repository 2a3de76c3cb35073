"""The one explicit registry of architectures: `architectures` in config.json -> module.

Each module provides `config(hf_config: dict) -> Config` (a frozen dataclass read explicitly
from config.json) and `build(config, checkpoint, max_seq) -> onnx_ir.Model`. Adding a model is
adding a file and a line here.
"""

from __future__ import annotations

from types import ModuleType

from compiler.errors import KilnError
from compiler.frontend.models import bert, gemma3, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe

REGISTRY: dict[str, ModuleType] = {
    llama.ARCH: llama,
    mistral.ARCH: mistral,
    qwen2.ARCH: qwen2,
    qwen3.ARCH: qwen3,
    phi3.ARCH: phi3,
    gemma3.ARCH: gemma3,
    mixtral.ARCH: mixtral,
    qwen3_moe.ARCH: qwen3_moe,
    bert.ARCH: bert,
    **{alias: bert for alias in bert.ALIASES},
}


def arch_name(hf_config: dict) -> str:
    """The checkpoint's architecture as the registry knows it (an alias keeps its own name)."""
    return next(a for a in hf_config.get("architectures") or [] if a in REGISTRY)


def lookup(hf_config: dict) -> ModuleType:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in REGISTRY:
            return REGISTRY[arch]
    named = ", ".join(archs) if archs else "none (config.json has no 'architectures')"
    raise KilnError(f"unsupported architecture: {named}", f"kiln supports {', '.join(sorted(REGISTRY))}")
