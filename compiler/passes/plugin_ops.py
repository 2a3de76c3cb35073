"""Plugins in a build: the recipe's `plugins: [name, ...]` add each plugin's rewrite pass after
the recipe's passes; then the backend binds the plugin ops it can and the rest fall back to their
decompositions, with a warning in the build log and a record in kiln.json.

Binding today: ONNX Runtime's CPU provider has no `kiln` kernels, and TensorRT-RTX's Python
network API cannot add IPluginV3 layers (plugins reach TensorRT through its ONNX parser, see
plugins/tensorrt.py), so both run the decomposition: the plugin machinery is exercised end to
end, and a backend that gains a binding changes one entry of BINDINGS.
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx_ir as ir

from compiler.errors import KilnError

log = logging.getLogger("kiln.plugins")

# backend -> why it cannot bind plugin ops (None: it binds them)
BINDINGS = {
    "onnxruntime": "ONNX Runtime's CPU provider has no kernels for the kiln domain",
    "tensorrt": "TensorRT-RTX's network API has no add_plugin_v3 (plugins bind through the ONNX parser only)",
}


def rewrite_passes(recipe) -> list:
    """The rewrite passes of the recipe's plugins, after checking each can serve this recipe."""
    import plugins

    out = []
    for name in recipe.plugins:
        try:
            p = plugins.get(name)
        except KeyError as e:
            raise KilnError(str(e).strip("'\""), "fix plugins: in the recipe (`kiln plugins list` shows them)") from None
        if p.rewrite is None:
            raise KilnError(f"plugin {name} has no rewrite pass: kiln cannot place it in a graph yet",
                            f"remove {name} from plugins: in the recipe")
        if p.engine_io and not _drives_engine_io(recipe):
            raise KilnError(f"plugin {name} changes the engine's inputs and outputs, which only the single-rank ONNX Runtime "
                            "CPU runtime drives so far", f"remove {name} from plugins:, or build for onnxruntime on cpu, tp=pp=1")
        out.append(p.make_rewrite())
    return out


def _drives_engine_io(recipe) -> bool:
    return recipe.backend == "onnxruntime" and recipe.onnxruntime.device == "cpu" and recipe.parallel.world_size == 1


def bind(model: ir.Model, backend: str) -> tuple[ir.Model, list[dict]]:
    """Bind or decompose every plugin op; returns the model and one record per plugin op type."""
    from plugins.onnxruntime import decompose, plugin_ops

    ops = plugin_ops(model)
    if not ops:
        return model, []
    counts = Counter(n.op_type for n in model.graph if n.domain == "kiln" and n.op_type in ops)
    why = BINDINGS.get(backend, f"{backend} binds no plugins")
    records = [{"op": f"kiln::{op}", "nodes": k, "bound": "decomposition", "why": why} for op, k in sorted(counts.items())]
    for r in records:
        log.warning("plugin %s: %d nodes fall back to the decomposition (%s)", r["op"], r["nodes"], why)
    return decompose(model, ops), records
