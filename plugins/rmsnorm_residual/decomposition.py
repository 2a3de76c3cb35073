"""kiln::RmsNormResidual in standard ONNX ops: Add, then RMSNormalization (opset 23+, fp32
statistics via stash_type 1): what ONNX Runtime runs, and any backend without the kernel."""

from __future__ import annotations

from onnx import helper

from plugins.spec import ref_attr


def decomposition() -> list:
    norm = helper.make_node("RMSNormalization", ["sum", "weight"], ["y"], axis=-1, stash_type=1)
    norm.attribute.append(ref_attr("epsilon", "float"))
    return [helper.make_node("Add", ["x", "residual"], ["sum"]), norm]
