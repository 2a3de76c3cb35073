"""Dead-code and constant cleanup.

`dce` is onnx_ir's RemoveUnusedNodesPass under its recipe name. `dedupe_constants` merges small
in-memory constants of equal value (the builders emit one shape constant per use). It is ours, not
onnx_ir's DeduplicateInitializersPass, for one reason: that pass also reads and merges small lazy
checkpoint weights, and two layers' equal norm weights (all ones in many checkpoints) would become
one initializer, so a smoothing fold into one layer's norm would change the other's. Lazy weights
are never read or merged here.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compiler.passes.base import Pass, PassResult

_SMALL = 4096  # elements


class DeadCodeElimination(Pass):
    """Remove nodes nobody reads and initializers nobody uses."""

    name = "dce"

    def run(self, model: ir.Model) -> PassResult:
        before = (len(model.graph), len(model.graph.initializers))
        RemoveUnusedNodesPass()(model)
        after = (len(model.graph), len(model.graph.initializers))
        return PassResult(model, after != before)


class DedupeConstants(Pass):
    """Merge small in-memory constants of equal value (never lazy checkpoint weights)."""

    name = "dedupe_constants"

    def run(self, model: ir.Model) -> PassResult:
        g = model.graph
        seen: dict[tuple, ir.Value] = {}
        merged = 0
        for name, value in list(g.initializers.items()):
            t = value.const_value
            if t is None or isinstance(t, ir.LazyTensor) or t.size > _SMALL or value in g.inputs or value.is_graph_output():
                continue
            key = (t.dtype, tuple(t.shape), t.tobytes())
            keep = seen.setdefault(key, value)
            if keep is value:
                continue
            value.replace_all_uses_with(keep)
            del g.initializers[name]
            merged += 1
        return PassResult(model, merged > 0, [f"merged {merged} duplicate constants"] if merged else [])
