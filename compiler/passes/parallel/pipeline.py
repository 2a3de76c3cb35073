"""pipeline_stage: the graph of one pipeline stage, layers [first, end) of the decoder.

Nodes are assigned by their metadata (compiler/ir/meta.py), never their names: layer i's nodes
to layer i, nodes of role "inputs" (positions, masks, rope tables: cheap and derived from graph
inputs) to every stage that reads them, nodes before the first layer (the embedding) to stage 0
and nodes after the last layer (final norm, lm_head) to the last stage. The value that crosses
into the stage becomes the graph input `hidden_in` [batch, seq, H]; the value that leaves it
for the next stage becomes the graph output `hidden_out`. The runtime moves them between ranks
with send/recv. Graph inputs and outputs of other stages (their KV caches, input_ids, logits)
are dropped.
"""

from __future__ import annotations

import onnx_ir as ir

from compiler.errors import KilnError
from compiler.ir import meta
from compiler.passes.base import Pass, PassResult

HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"


def _owner(nodes: list[ir.Node]) -> dict[ir.Node, int | str]:
    """node -> layer index, "shared" (role inputs), "pre" (before the first layer) or "post"."""
    layer_of = {n: i for n in nodes if (i := meta.layer_of(n)) is not None}
    first = min((i for i, n in enumerate(nodes) if n in layer_of), default=len(nodes))
    out: dict[ir.Node, int | str] = {}
    for i, n in enumerate(nodes):
        if n in layer_of:
            out[n] = layer_of[n]
        elif meta.role_of(n) == meta.INPUTS:
            out[n] = "shared"
        else:
            out[n] = "pre" if i < first else "post"
    return out


class PipelineStage(Pass):
    """Keep this pipeline stage's layers only, with the hidden state as input and output."""

    name = "pipeline_stage"

    def __init__(self, stage: int, stages: tuple[tuple[int, int], ...], hidden_size: int):
        self.stage, self.stages, self.hidden = stage, stages, hidden_size

    def run(self, model: ir.Model) -> PassResult:
        if len(self.stages) == 1:
            return PassResult(model, False)
        g = model.graph
        lo, hi = self.stages[self.stage]
        first, last = self.stage == 0, self.stage == len(self.stages) - 1
        owner = _owner(list(g))

        def kept(n: ir.Node) -> bool:
            o = owner[n]
            return (o == "shared" or (o == "pre" and first) or (o == "post" and last)
                    or (isinstance(o, int) and lo <= o < hi))

        keep = {n for n in g if kept(n)}
        crossing_in = {v for n in keep for v in n.inputs
                       if v is not None and v.producer() is not None and v.producer() not in keep}
        crossing_out = {v for n in keep if owner[n] != "shared" for v in n.outputs if any(u not in keep for u, _ in v.uses())}
        if not first:
            self._boundary(g, crossing_in, HIDDEN_IN, as_input=True)
        if not last:
            self._boundary(g, crossing_out, HIDDEN_OUT, as_input=False)
        drop = [n for n in reversed(list(g)) if n not in keep]
        for v in list(g.outputs):
            if v.producer() not in keep and v.name != HIDDEN_OUT:
                g.outputs.remove(v)
        for n in drop:
            for v in n.outputs:
                for user, idx in list(v.uses()):
                    user.replace_input_with(idx, None)
        g.remove(drop, safe=False)
        used = {v for n in g for v in n.inputs if v is not None}
        for v in list(g.inputs):
            if v not in used and v.name != HIDDEN_IN:
                g.inputs.remove(v)
        for name, v in list(g.initializers.items()):  # other stages' weights
            if v not in used:
                del g.initializers[name]
        return PassResult(model, True, [f"stage {self.stage}: layers {lo}..{hi - 1}, {len(drop)} nodes of other stages dropped"])

    def _boundary(self, g: ir.Graph, values: set[ir.Value], name: str, as_input: bool) -> None:
        if len(values) != 1:
            names = ", ".join(sorted(v.name for v in values)) or "none"
            raise KilnError(f"pipeline_stage {self.stage}: expected one hidden state across the stage boundary, found {names}",
                            "pipeline stages need a decoder whose layers pass one residual stream")
        (v,) = values
        if as_input:
            h = ir.Value(name=HIDDEN_IN, type=ir.TensorType(v.dtype or ir.DataType.FLOAT),
                         shape=ir.Shape(["batch", "seq", self.hidden]))
            g.inputs.append(h)
            v.replace_all_uses_with(h)
        else:
            v.name = HIDDEN_OUT
            v.type = v.type or ir.TensorType(ir.DataType.FLOAT)
            v.shape = ir.Shape(["batch", "seq", self.hidden])
            g.outputs.append(v)
