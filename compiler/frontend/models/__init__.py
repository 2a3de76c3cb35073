"""The one explicit registry of architectures: `architectures` in config.json -> Architecture.

Each model file defines `ARCHITECTURE`, an `Architecture` (compiler/frontend/models/architecture.py):
its `config(hf_config: dict)` reads config.json into a frozen dataclass, its `build(config,
checkpoint, max_seq)` returns the onnx_ir.Model, and its fields say the task, the weights it may
leave unread and its tensor-parallel shards. Adding a model is adding a file and a line here.
"""

from __future__ import annotations

from compiler.errors import KilnError
from compiler.frontend.models import bert, gemma3, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe
from compiler.frontend.models.architecture import Architecture

ARCHITECTURES: tuple[Architecture, ...] = (
    llama.ARCHITECTURE,
    mistral.ARCHITECTURE,
    qwen2.ARCHITECTURE,
    qwen3.ARCHITECTURE,
    phi3.ARCHITECTURE,
    gemma3.ARCHITECTURE,
    mixtral.ARCHITECTURE,
    qwen3_moe.ARCHITECTURE,
    bert.ARCHITECTURE,
)

# every name config.json may give (an architecture's own and its aliases) -> the Architecture
REGISTRY: dict[str, Architecture] = {name: a for a in ARCHITECTURES for name in (a.name, *a.aliases)}


def arch_name(hf_config: dict) -> str:
    """The checkpoint's architecture as the registry knows it (an alias keeps its own name)."""
    return next(a for a in hf_config.get("architectures") or [] if a in REGISTRY)


def lookup(hf_config: dict) -> Architecture:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in REGISTRY:
            return REGISTRY[arch]
    named = ", ".join(archs) if archs else "none (config.json has no 'architectures')"
    raise KilnError(f"unsupported architecture: {named}", f"kiln supports {', '.join(sorted(REGISTRY))}")
