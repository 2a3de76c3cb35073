"""kiln::RmsNormResidualInt8: kiln::RmsNormResidual whose normalised output is quantised to int8
by a per-tensor scale, so a W8A8 projection after the norm reads int8 activations.

  sum = x + residual;  y = saturate(round_half_even(rmsnorm(sum) * weight / scale))   int8
Inputs x, residual [..., H], weight [H], scale [] (x's dtype). Outputs y (int8) and sum.
"""

from __future__ import annotations

import onnx

from plugins.rmsnorm_residual import schema as base
from plugins.spec import Port

OP_TYPE = "RmsNormResidualInt8"
INPUTS = (*base.INPUTS, Port("scale", "[] per-tensor scale of y"))
OUTPUTS = (Port("y", "[..., H] int8 normalised sum"), base.OUTPUTS[1])
ATTRS = base.ATTRS


def infer(dtypes: list, shapes: list, attrs: dict) -> list[tuple]:
    if len(shapes[3]) != 0:
        raise ValueError(f"RmsNormResidualInt8: scale must be a scalar, got {shapes[3]}")
    (_, y_shape), sum_out = base.infer(dtypes[:3], shapes[:3], attrs)
    return [(onnx.TensorProto.INT8, y_shape), sum_out]
