"""Plugins in a build: the recipe's `plugins: [name, ...]` add each plugin's rewrite pass after
the recipe's passes; then the backend binds the plugin ops it can and the rest fall back to their
decompositions, with a warning in the build log and a record in kiln.json.

Binding today: ONNX Runtime's CPU provider has no `kiln` kernels, and TensorRT-RTX's Python
network API cannot add IPluginV3 layers (plugins reach TensorRT through its ONNX parser, see
plugins/tensorrt.py), so both run the decomposition: the plugin machinery is exercised end to
end, and a backend that gains a binding changes one entry of PLUGIN_BINDINGS.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir

from compiler.errors import KilnError
from compiler.passes.base import Pass, PassResult

log = logging.getLogger("kiln.plugins")


@dataclass(frozen=True)
class PluginBinding:
    """Whether a backend runs plugin ops as their kernels (binds) or as their decompositions, and why."""

    binds: bool
    why: str


PLUGIN_BINDINGS: dict[str, PluginBinding] = {
    "onnxruntime": PluginBinding(False, "ONNX Runtime's CPU provider has no kernels for the kiln domain"),
    "tensorrt": PluginBinding(False, "TensorRT-RTX's network API has no add_plugin_v3 (plugins bind through the ONNX parser only)"),
}
# ops a backend runs as kernels of its own, where its default above is the decomposition
OP_BINDINGS: dict[tuple[str, str], PluginBinding] = {
    ("onnxruntime", "PagedAttention"): PluginBinding(True, "the engine is cut at it and kiln's CPU kernel runs it between the parts"),
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
    default = PLUGIN_BINDINGS.get(backend, PluginBinding(False, f"{backend} binds no plugins"))
    records, decomposed = [], []
    for op, k in sorted(counts.items()):
        binding = OP_BINDINGS.get((backend, op), default)
        records.append({"op": f"kiln::{op}", "nodes": k, "bound": "kernel" if binding.binds else "decomposition", "why": binding.why})
        if not binding.binds:
            log.warning("plugin kiln::%s: %d nodes fall back to the decomposition (%s)", op, k, binding.why)
            decomposed.append(op)
    return (decompose(model, decomposed) if decomposed else model), records


class BindPlugins(Pass):
    """Bind the plugin ops the backend can run; the rest become their decompositions."""

    name = "bind_plugins"

    def __init__(self, backend: str):
        self.backend = backend
        self.records: list[dict] = []  # kiln.json `plugins`: one per plugin op type

    def run(self, model: ir.Model) -> PassResult:
        model, self.records = bind(model, self.backend)
        notes = [f"{r['op']}: {r['nodes']} nodes as its {r['bound']} ({r['why']})" for r in self.records]
        return PassResult(model, bool(self.records), notes)
