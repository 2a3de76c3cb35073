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


def decompose(model: ir.Model) -> ir.Model:
    """Inline every plugin op that has a decomposition function; other kiln ops (collectives) stay."""
    if not plugin_ops(model):
        return model
    keep = {k: f for k, f in model.functions.items() if k[1] == "AllReduce"}  # collectives are cut, not inlined
    for k in keep:
        del model.functions[k]
    InlinePass()(model)
    RemoveUnusedFunctionsPass()(model)
    model.functions.update(keep)
    return model
