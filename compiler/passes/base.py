"""The pass interface and the PassManager, on onnx_ir's pass infrastructure.

A kiln pass is an `onnx_ir.passes.InPlacePass` with a `name` (what recipes, `--list-passes`,
`--dump-ir` and kiln.json call it) whose `run(model)` returns a PassResult: onnx_ir's
(model, modified) plus `notes`, one line each on what it did or why it refused a match.
The PassManager runs a list of passes in order through onnx_ir's `PassBase.__call__` (pre and
post conditions, the in-place contract), records each (name, changed, seconds, nodes, notes),
logs it, and with `dump_dir` writes the graph after each as text (`NN-<pass>.txt`). Unlike
onnx_ir's own PassManager it does not wrap a pass's exception: a KilnError raised by a pass
(a refusal with its fix) reaches the user as the one line it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

log = logging.getLogger("kiln.passes")


@dataclass
class PassResult(ir.passes.PassResult):
    notes: list[str] = field(default_factory=list)  # e.g. why a fusion refused a match

    @property
    def changed(self) -> bool:
        return self.modified


class Pass(ir.passes.InPlacePass):
    """Base of every kiln pass: subclasses set `name` and implement `run`."""

    name: str = "pass"

    def run(self, model: ir.Model) -> PassResult:
        raise NotImplementedError

    def call(self, model: ir.Model) -> PassResult:
        result = self.run(model)
        if not isinstance(result, PassResult):  # an onnx_ir pass's result: no notes
            result = PassResult(result.model, result.modified)
        return result

    def describe(self) -> str:
        """One line for `kiln build --list-passes`: the first line of the class docstring."""
        doc = (type(self).__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


@dataclass
class PassRecord:
    name: str
    changed: bool
    seconds: float
    nodes_after: int
    notes: list[str]


class PassManager(ir.passes.InPlacePass):
    """Runs passes in order, recording and (with dump_dir) dumping the graph after each."""

    def __init__(self, passes: list[Pass], dump_dir: Path | None = None):
        super().__init__()
        self.passes = passes
        self.dump_dir = dump_dir
        self.records: list[PassRecord] = []

    def call(self, model: ir.Model) -> PassResult:
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / "00-input.txt").write_text(graph_text(model))
        changed = False
        for n, p in enumerate(self.passes, start=1):
            t0 = time.perf_counter()
            result = p(model)
            notes = getattr(result, "notes", [])
            rec = PassRecord(p.name, result.modified, time.perf_counter() - t0, len(model.graph), notes)
            self.records.append(rec)
            changed = changed or rec.changed
            log.info("pass %s: changed=%s nodes=%d (%.2fs)", p.name, rec.changed, rec.nodes_after, rec.seconds)
            for note in notes:
                log.info("pass %s: %s", p.name, note)
            if self.dump_dir:
                (self.dump_dir / f"{n:02d}-{p.name}.txt").write_text(graph_text(model))
        return PassResult(model, changed)

    def run(self, model: ir.Model) -> ir.Model:
        """Run every pass on model (in place) and return it."""
        return self(model).model


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
