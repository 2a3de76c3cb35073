"""Shape inference: ONNX's inference over the graph (weights stay out of it), merged back.

The `kiln::` collectives are model-local functions (Identity bodies), so ONNX infers through them.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from compiler.passes.base import Pass, PassResult


class ShapeInference(Pass):
    """Infer every value's type and shape with ONNX's inference (weights stay out of it)."""

    name = "shape_inference"

    def run(self, model: ir.Model) -> PassResult:
        result = ShapeInferencePass(check_type=True, strict_mode=True, data_prop=True)(model)
        return PassResult(result.model, result.modified)
