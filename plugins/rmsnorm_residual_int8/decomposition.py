"""kiln::RmsNormResidualInt8 in standard ONNX ops: rmsnorm_residual's decomposition into a
float y, then QuantizeLinear (int8, zero point 0)."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from plugins.rmsnorm_residual.decomposition import decomposition as rmsnorm_residual


def decomposition() -> list:
    nodes = rmsnorm_residual()
    for n in nodes:  # the float output becomes internal
        n.output[:] = ["y_float" if o == "y" else o for o in n.output]
    zero = helper.make_node("Constant", [], ["zero_point"], value=numpy_helper.from_array(np.int8(0), "zero_point"))
    return [*nodes, zero, helper.make_node("QuantizeLinear", ["y_float", "scale", "zero_point"], ["y"])]
