"""The pass interface and the PassManager.

A pass is an object with a `name` and `run(model) -> PassResult(model, changed)`. The
PassManager runs named passes in order, logs what each changed, and with `dump_dir` writes the
graph after each pass as text (`NN-<pass>.txt`), the `--dump-ir` of `kiln build`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import onnx_ir as ir

log = logging.getLogger("kiln.passes")


@dataclass
class PassResult:
    model: ir.Model
    changed: bool
    notes: list[str] = field(default_factory=list)  # e.g. why a fusion refused a match


class Pass(Protocol):
    name: str

    def run(self, model: ir.Model) -> PassResult: ...


@dataclass
class PassRecord:
    name: str
    changed: bool
    seconds: float
    nodes_after: int
    notes: list[str]


class PassManager:
    def __init__(self, passes: list[Pass], dump_dir: Path | None = None):
        self.passes = passes
        self.dump_dir = dump_dir
        self.records: list[PassRecord] = []

    def run(self, model: ir.Model) -> ir.Model:
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / "00-input.txt").write_text(graph_text(model))
        for n, p in enumerate(self.passes, start=1):
            t0 = time.perf_counter()
            result = p.run(model)
            model = result.model
            rec = PassRecord(p.name, result.changed, time.perf_counter() - t0, len(model.graph), result.notes)
            self.records.append(rec)
            log.info("pass %s: changed=%s nodes=%d (%.2fs)", p.name, rec.changed, rec.nodes_after, rec.seconds)
            for note in result.notes:
                log.info("pass %s: %s", p.name, note)
            if self.dump_dir:
                (self.dump_dir / f"{n:02d}-{p.name}.txt").write_text(graph_text(model))
        return model


def graph_text(model: ir.Model) -> str:
    """One line per node: `name: Op(inputs) -> outputs`, then the initializers' shapes."""
    g = model.graph
    lines = [f"graph {g.name}: {len(g)} nodes, {len(g.initializers)} initializers"]
    lines += [f"input  {v.name}: {v.type} {v.shape}" for v in g.inputs]
    for node in g:
        ins = ", ".join(v.name if v is not None else "" for v in node.inputs)
        outs = ", ".join(v.name for v in node.outputs)
        op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        lines.append(f"{node.name}: {op}({ins}) -> {outs}")
    lines += [f"output {v.name}: {v.type} {v.shape}" for v in g.outputs]
    lines += [f"init   {name}: {v.type} {v.shape}" for name, v in g.initializers.items()]
    return "\n".join(lines) + "\n"
