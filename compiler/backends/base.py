"""What every backend is to the build: the Backend protocol, its registry, and the one rank loop.

A backend is made for one build (compiler.backends.make, the registry) and then:
  check(model)                       refuses what it cannot compile, before it writes anything
  emit_rank(model, target, out)      writes one rank's files, returns a RankOutput
  engine(ranks, parallel)            the artifact's EngineConfig from every rank's output
  record(engine)                     kiln.json's `backend` section
`emit` runs the loop for single- and multi-rank builds alike and writes the one engine.json.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import onnx_ir as ir

from compiler.runtime.config import EngineConfig, GenerationDefaults, ParallelSpec, RankSpec
from compiler.runtime.manifest import write_engine


@dataclass(frozen=True)
class ModelFacts:
    """What a backend needs to know about the model beyond the graph (a rank's, in a tp build)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    generation: GenerationDefaults
    task: str = "generate"  # "embed": an encoder, no KV cache


@dataclass(frozen=True)
class RankTarget:
    rank: int
    world_size: int

    @property
    def single(self) -> bool:
        return self.world_size == 1


@dataclass
class RankOutput:
    model_file: str  # the rank's model or engine file
    engine: EngineConfig | None  # what this rank alone would serve (None: the backend composes it)
    steps: list[dict] = field(default_factory=list)  # multi-rank: what the runtime runs, in order


class Backend(Protocol):
    name: str
    flavour: str  # kiln.json's backend.graph: what the graph became (standard, ort-contrib, ...)

    def check(self, model: ir.Model) -> None: ...

    def emit_rank(self, model: ir.Model, target: RankTarget, out: Path) -> RankOutput: ...

    def engine(self, ranks: list[RankOutput], parallel: ParallelSpec | None) -> EngineConfig: ...

    def record(self, engine: EngineConfig) -> dict: ...


@dataclass
class Emitted:
    engine: EngineConfig
    first_model_nodes: int  # rank 0's graph, as emitted


def emit(backend: Backend, models: Iterator[ir.Model], world_size: int, out: Path,
         rank_spec: Callable[[int, RankOutput], RankSpec] | None = None,
         parallel: Callable[[list[RankSpec]], ParallelSpec] | None = None, runtime_defaults: dict | None = None) -> Emitted:
    """Check and emit each rank's graph as it is taken (one in memory at a time), then write engine.json.
    rank_spec/parallel: the build side's description of each rank and of the layout (multi-rank);
    runtime_defaults: the recipe's `speculative` / `serve` sections, recorded for the runtime."""
    outputs, specs, nodes = [], [], 0
    for r, model in enumerate(models):
        backend.check(model)
        nodes = nodes or len(model.graph)
        o = backend.emit_rank(model, RankTarget(r, world_size), out)
        outputs.append(o)
        if world_size > 1:
            specs.append(rank_spec(r, o))
        del model
        gc.collect()
    engine = backend.engine(outputs, parallel(specs) if world_size > 1 else None)
    engine = dataclasses.replace(engine, **(runtime_defaults or {}))
    write_engine(out, engine)
    return Emitted(engine, nodes)
