"""Residual Add + RMSNormalization -> com.microsoft.SkipSimplifiedLayerNormalization.

The fusion is onnxscript's (`ort_fusions.skip_normalization`: Add + SimplifiedLayerNormalization
-> SkipSimplifiedLayerNormalization, one pass over memory instead of three kernels, the residual
sum as its 4th output). It matches ONNX Runtime's SimplifiedLayerNormalization, while kiln's graph
holds the standard RMSNormalization (opset 23); the one rule of ours renames that op to ORT's,
which computes the same thing:
  Pattern: y = RMSNormalization(x, w) on the last axis.
  Replacement: SimplifiedLayerNormalization(x, w) with the same epsilon and stash_type.
  Check: refuses when the norm is not over the last axis or its scale is not a constant vector.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset


class RmsNormAsSimplified(pattern.RewriteRuleClassBase):
    """RMSNormalization (ONNX) -> SimplifiedLayerNormalization (ONNX Runtime's, default domain)."""

    def __init__(self, refused: list[str]):
        super().__init__("RmsNormAsSimplified")
        self.refused = refused

    def pattern(self, op, x, scale):
        return op.RMSNormalization(x, scale, _allow_other_attributes=True, _outputs=["normalized"])

    def check(self, context, x, scale, normalized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        norm = normalized.producer()
        if norm.attributes.get_int("axis", -1) != -1:
            self.refused.append(f"SkipSimplifiedLayerNormalization: {norm.name} refused: normalisation is not over the last axis")
            return result.fail("normalisation is not over the last axis")
        if scale.const_value is None or scale.shape is None or len(scale.shape) != 1:
            self.refused.append(f"SkipSimplifiedLayerNormalization: {norm.name} refused: scale is not a constant vector")
            return result.fail("scale is not a constant vector")
        return result

    def rewrite(self, op, x, scale, normalized, **_):
        norm = normalized.producer()
        return op.SimplifiedLayerNormalization(
            x, scale, axis=-1, epsilon=norm.attributes.get_float("epsilon", 1e-5),
            stash_type=norm.attributes.get_int("stash_type", 1), _name=norm.name.replace("RMSNormalization", "SimplifiedLayerNormalization"))


def rules(refused: list[str]) -> list[pattern.RewriteRuleSet]:
    """In order: ours (the rename), then onnxscript's skip fusion over what it produced."""
    return [pattern.RewriteRuleSet([RmsNormAsSimplified.rule(refused)]), skip_rms_normalization_ruleset]
