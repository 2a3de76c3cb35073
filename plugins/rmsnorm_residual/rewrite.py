"""fuse_rmsnorm_residual: the pass that puts kiln::RmsNormResidual into kiln's decoder graphs.

Pattern:      sum = Add(a, b);  y = RMSNormalization(sum, weight)   (sum may have other readers:
              it is the next residual)
Replacement:  y, sum = kiln::RmsNormResidual(a, b, weight, epsilon)
Check:        refuses (and says why) a norm not over the last axis, a non-constant or non-vector
              weight, and an Add whose inputs differ in shape (a broadcast).
The pattern and its check are the ones ONNX Runtime's SkipSimplifiedLayerNormalization
legalisation uses (compiler/backends/onnxruntime/skip_norm.py): one definition serves both.
The op's decomposition is attached to the model as a local function, so the graph stays a valid
ONNX model that ONNX's shape inference and any backend without the kernel can read.
"""

from __future__ import annotations

import onnx_ir as ir

from compiler.backends.onnxruntime.skip_norm import check, match
from compiler.passes.base import PassResult
from plugins.spec import DOMAIN


def replace(graph: ir.Graph, norm: ir.Node, add: ir.Node) -> None:
    eps = norm.attributes.get_float("epsilon", 1e-5)
    fused = ir.Node(DOMAIN, "RmsNormResidual", [add.inputs[0], add.inputs[1], norm.inputs[1]],
                    attributes=[ir.AttrFloat32("epsilon", eps)], num_outputs=2,
                    name=norm.name.rsplit("/", 1)[0] + "/RmsNormResidual")
    y, s = fused.outputs
    y.name, s.name = f"{fused.name}_output_0", f"{fused.name}_output_1"
    y.type, y.shape, s.type, s.shape = norm.outputs[0].type, norm.outputs[0].shape, add.outputs[0].type, add.outputs[0].shape
    graph.insert_before(add, fused)
    norm.outputs[0].replace_all_uses_with(y)
    add.outputs[0].replace_all_uses_with(s)
    for v in (norm.outputs[0], add.outputs[0]):
        if v.is_graph_output():
            graph.outputs[graph.outputs.index(v)] = y if v is norm.outputs[0] else s
    graph.remove([norm, add], safe=True)


class FuseRmsNormResidual:
    name = "fuse_rmsnorm_residual"

    def run(self, model: ir.Model) -> PassResult:
        from plugins.rmsnorm_residual import PLUGIN

        graph, notes, fused = model.graph, [], 0
        for norm in list(graph):
            add = match(norm)
            if add is None:
                continue
            why = check(norm, add)
            if why:
                notes.append(f"{norm.name}: refused: {why}")
                continue
            replace(graph, norm, add)
            fused += 1
        if fused:
            graph.opset_imports.setdefault(DOMAIN, 1)
            fn = ir.serde.deserialize_function(PLUGIN.function())
            model.functions.setdefault(fn.identifier(), fn)
        return PassResult(model, fused > 0, [f"fused {fused} residual adds with their RMSNorm", *notes])

