"""What an architecture gives the build: one frozen `Architecture` per model file.

Each file under compiler/frontend/models/ defines `ARCHITECTURE = Architecture(...)`, and the
registry (compiler/frontend/models/__init__.py) lists them. Consumers read its typed fields;
nothing is probed with getattr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Literal, TypeVar

import onnx_ir as ir

from compiler.frontend.checkpoint import Checkpoint
from compiler.frontend.sharding import ShardSpec

C = TypeVar("C")  # the architecture's typed config (a frozen dataclass)

Task = Literal["generate", "embed"]


@dataclass(frozen=True)
class Architecture(Generic[C]):
    name: str  # the `architectures` entry of config.json, e.g. "LlamaForCausalLM"
    config: Callable[[dict], C]  # config.json -> the typed config, every key checked
    build: Callable[[C, Checkpoint, int], ir.Model]  # (config, checkpoint, max_seq) -> lazy graph
    task: Task = "generate"  # "generate": a causal LM; "embed": an encoder with pooled outputs
    ignored_weights: tuple[str, ...] = ()  # globs of checkpoint tensors the graph may leave unread
    shards: tuple[ShardSpec, ...] = ()  # tensor-parallel split of its projections; () = not shardable
    aliases: tuple[str, ...] = ()  # other `architectures` entries built the same way

    @property
    def shardable(self) -> bool:
        return bool(self.shards)
