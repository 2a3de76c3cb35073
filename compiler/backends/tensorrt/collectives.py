"""Lowering of the `kiln::` collectives to TensorRT's distributed-collective layers.

`kiln::AllReduce(sum)` over the tp group becomes IDistCollectiveLayer(ALL_REDUCE, SUM): the
engine holds the collective, and at run time TensorRT performs it with the NCCL communicator
the execution context is given (one per rank). groups=None: the whole communicator, which the
runtime creates per tp group.
"""

from __future__ import annotations

import onnx_ir as ir

from compiler.backends.tensorrt.network import Lowering, LoweringError


def all_reduce(lw: Lowering, node: ir.Node):
    trt = lw.trt
    reduction = node.attributes.get("reduction")
    if reduction is not None and reduction.value != "sum":
        raise LoweringError(node, f"all-reduce with {reduction.value}", "only sum all-reduces are lowered")
    if not hasattr(lw.net, "add_dist_collective"):
        raise LoweringError(node, f"{lw.flavour.name} {lw.flavour.version} has no distributed-collective layer",
                            "use a TensorRT(-RTX) release with IDistCollectiveLayer, or backend: onnxruntime")
    layer = lw.net.add_dist_collective(lw.get(node.inputs[0]), trt.CollectiveOperation.ALL_REDUCE, trt.ReduceOperation.SUM, -1, None)
    return [lw.name(layer, node).get_output(0)]


OPS = {"AllReduce": all_reduce}
