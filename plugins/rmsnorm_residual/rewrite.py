"""fuse_rmsnorm_residual: the pass that puts kiln::RmsNormResidual into kiln's decoder graphs.

An onnxscript rewriter rule:
  Pattern:      sum = Add(a, b);  y = RMSNormalization(sum, weight)   (sum may have other readers:
                it is the next residual, so it is an output of the pattern too)
  Replacement:  y, sum = kiln::RmsNormResidual(a, b, weight, epsilon)
  Check:        refuses (and says why) a norm not over the last axis, a non-constant or non-vector
                weight, and an Add whose inputs differ in shape (a broadcast).
The rewriter carries the replaced nodes' metadata (layer, role) over to the fused node. The op's
decomposition is attached to the model as a local function, so the graph stays a valid ONNX
model that ONNX's shape inference and any backend without the kernel can read.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from compiler.passes.base import Pass, PassResult
from plugins.spec import DOMAIN


class RmsNormResidualRule(pattern.RewriteRuleClassBase):
    """Residual Add + RMSNormalization -> kiln::RmsNormResidual."""

    def __init__(self, refused: list[str]):
        super().__init__("RmsNormResidual")
        self.refused = refused

    def pattern(self, op, a, b, weight):
        total = op.Add(a, b, _outputs=["total"])
        return op.RMSNormalization(total, weight, _allow_other_attributes=True, _outputs=["normalized"]), total

    def check(self, context, a, b, weight, normalized, **_) -> pattern.MatchResult:
        norm, why = normalized.producer(), None
        if norm.attributes.get_int("axis", -1) != -1:
            why = "normalisation is not over the last axis"
        elif weight.const_value is None or weight.shape is None or len(weight.shape) != 1:
            why = "scale is not a constant vector"
        elif a.shape is None or b.shape is None or a.shape != b.shape:
            why = "the residual Add broadcasts or has unknown shapes"
        if why:
            self.refused.append(f"{norm.name}: refused: {why}")
            return pattern.MatchResult().fail(why)
        return pattern.MatchResult()

    def rewrite(self, op, a, b, weight, normalized, total, **_):
        norm = normalized.producer()
        name = norm.name.rsplit("/", 1)[0] + "/RmsNormResidual"
        return op.RmsNormResidual(a, b, weight, epsilon=norm.attributes.get_float("epsilon", 1e-5),
                                  _domain=DOMAIN, _outputs=[f"{name}_output_0", f"{name}_output_1"], _name=name)


class FuseRmsNormResidual(Pass):
    """Fuse each residual Add + RMSNormalization into kiln::RmsNormResidual."""

    name = "fuse_rmsnorm_residual"

    def run(self, model: ir.Model) -> PassResult:
        from plugins.rmsnorm_residual import PLUGIN

        refused: list[str] = []
        fused = pattern.RewriteRuleSet([RmsNormResidualRule.rule(refused)]).apply_to_model(model)
        graph, notes = model.graph, refused
        if fused:
            graph.opset_imports.setdefault(DOMAIN, 1)
            fn = ir.serde.deserialize_function(PLUGIN.function())
            model.functions.setdefault(fn.identifier(), fn)
        return PassResult(model, fused > 0, [f"fused {fused} residual adds with their RMSNorm", *notes])

