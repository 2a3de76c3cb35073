"""kiln::RmsNormResidual: the residual add and the RMSNorm after it, in one pass over memory.

  sum = x + residual                                    [..., H]
  y   = sum / sqrt(mean(sum^2, -1) + epsilon) * weight  [..., H]
Inputs x, residual [..., H] (same dtype), weight [H]. Outputs y and sum, shaped like x. The
statistics are computed in fp32 whatever the input dtype (as the frontend's RMSNormalization
with stash_type 1 does).
"""

from __future__ import annotations

from plugins.spec import Attr, Port

OP_TYPE = "RmsNormResidual"
INPUTS = (Port("x", "[..., H] the block's output"), Port("residual", "[..., H] the residual stream"),
          Port("weight", "[H] the norm's scale"))
OUTPUTS = (Port("y", "[..., H] normalised sum"), Port("sum", "[..., H] x + residual (the next residual)"))
ATTRS = (Attr("epsilon", "float", 1e-5, "added to the mean square"),)


def infer(dtypes: list, shapes: list, attrs: dict) -> list[tuple]:
    x, residual, weight = shapes
    if len(x) != len(residual) or any(a != b for a, b in zip(x, residual) if isinstance(a, int) and isinstance(b, int)):
        raise ValueError(f"RmsNormResidual: x {x} and residual {residual} must have one shape")
    if len(weight) != 1 or (isinstance(weight[0], int) and isinstance(x[-1], int) and weight[0] != x[-1]):
        raise ValueError(f"RmsNormResidual: weight {weight} must be [H] with H = {x[-1]}")
    if dtypes[0] != dtypes[1]:
        raise ValueError(f"RmsNormResidual: x is {dtypes[0]} but residual is {dtypes[1]}")
    return [(dtypes[0], list(x)), (dtypes[0], list(x))]
