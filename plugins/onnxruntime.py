"""ONNX Runtime binding of kiln plugins: the decomposition.

ONNX Runtime's CPU provider has no kernel for the `kiln` domain, so a plugin op runs as its
decomposition: the op's model-local function is inlined into standard ops before the graph is
legalised (so ONNX Runtime's own fusions still see the plain pattern).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass

from plugins.spec import DOMAIN


def plugin_ops(model: ir.Model) -> list[str]:
    """Op types of the plugins in the graph (collectives are kiln ops too, but not plugins)."""
    import plugins

    known = {p.op_type for p in plugins.available().values()}
    return sorted({n.op_type for n in model.graph if n.domain == DOMAIN and n.op_type in known})


def decompose(model: ir.Model, ops: list[str] | None = None) -> ir.Model:
    """Inline the plugin ops (ops: their types, default all in the graph) into their decompositions;
    every other model-local function (the collectives, which are cut, not inlined) stays."""
    ops = plugin_ops(model) if ops is None else ops
    if not ops:
        return model
    keep = {k: f for k, f in model.functions.items() if not (k[0] == DOMAIN and k[1] in ops)}
    for k in keep:
        del model.functions[k]
    InlinePass()(model)
    RemoveUnusedFunctionsPass()(model)
    model.functions.update(keep)
    return model
