"""Shape inference: ONNX's inference over the graph (weights stay out of it), merged back.

ONNX knows no `kiln::` collectives; their outputs have their input's type and shape (an
all-reduce keeps both), so after a first round those are filled in and inference runs again for
everything downstream of them.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from compiler.passes.base import PassResult

_SHAPE_PRESERVING = {("kiln", "AllReduce")}


class ShapeInference:
    name = "shape_inference"

    def run(self, model: ir.Model) -> PassResult:
        result = ShapeInferencePass(check_type=True, strict_mode=True, data_prop=True)(model)
        model, changed = result.model, result.modified
        collectives = [n for n in model.graph if (n.domain, n.op_type) in _SHAPE_PRESERVING]
        for node in collectives:
            src, out = node.inputs[0], node.outputs[0]
            out.type, out.shape = src.type, src.shape
        if collectives:
            model = ShapeInferencePass(check_type=True, strict_mode=True, data_prop=True)(model).model
        return PassResult(model, changed or bool(collectives))
