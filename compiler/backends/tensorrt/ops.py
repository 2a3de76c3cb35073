"""Per-op lowering of the standard ONNX ops the frontend emits, one function per op type.

Each function takes the lowering context and the node and returns the node's output tensors.
RMSNormalization becomes the fp32 pattern TensorRT's builder fuses (TensorRT's normalization
layer has no RMS mode); RotaryEmbedding takes ONNX's [B, S, heads*D] form to TensorRT's
[B, heads, S, D] and back.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.backends.tensorrt.network import Lowering, LoweringError


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _static(lw: Lowering, node: ir.Node, i: int) -> np.ndarray:
    v = lw.const_value(node.inputs[i])
    if v is None:
        raise LoweringError(node, f"input {i} must be a constant", "this graph shape is not supported by the tensorrt backend")
    return v


def gather(lw: Lowering, node: ir.Node):
    layer = lw.net.add_gather(lw.get(node.inputs[0]), lw.get(node.inputs[1]), _attr(node, "axis", 0))
    return [lw.name(layer, node).get_output(0)]


def transpose(lw: Lowering, node: ir.Node):
    layer = lw.net.add_shuffle(lw.get(node.inputs[0]))
    layer.first_transpose = tuple(_attr(node, "perm"))
    return [lw.name(layer, node).get_output(0)]


def reshape(lw: Lowering, node: ir.Node):
    if _attr(node, "allowzero", 0):
        raise LoweringError(node, "allowzero=1 is not supported", "rebuild without allowzero")
    layer = lw.net.add_shuffle(lw.get(node.inputs[0]))
    dims = lw.const_value(node.inputs[1])
    if dims is None:  # a computed shape (e.g. Shape of another tensor)
        layer.set_input(1, lw.get(node.inputs[1]))
    else:
        layer.reshape_dims = tuple(int(d) for d in dims)  # 0 copies a dim, as in ONNX
    return [lw.name(layer, node).get_output(0)]


def unsqueeze(lw: Lowering, node: ir.Node):
    layer = lw.net.add_unsqueeze(lw.get(node.inputs[0]), lw.int_const(_static(lw, node, 1)))
    return [lw.name(layer, node).get_output(0)]


def matmul(lw: Lowering, node: ir.Node):
    a, b = lw.get(node.inputs[0]), lw.get(node.inputs[1])
    rank = max(len(a.shape), len(b.shape))
    layer = lw.net.add_matrix_multiply(lw.to_rank(a, rank), lw.trt.MatrixOperation.NONE,
                                       lw.to_rank(b, rank), lw.trt.MatrixOperation.NONE)
    return [lw.name(layer, node).get_output(0)]


def _elementwise(op_name: str):
    def lower(lw: Lowering, node: ir.Node):
        a, b = lw.get(node.inputs[0]), lw.get(node.inputs[1])
        rank = max(len(a.shape), len(b.shape))
        op = getattr(lw.trt.ElementWiseOperation, op_name)
        layer = lw.net.add_elementwise(lw.to_rank(a, rank), lw.to_rank(b, rank), op)
        return [lw.name(layer, node).get_output(0)]
    return lower


def sigmoid(lw: Lowering, node: ir.Node):
    layer = lw.net.add_activation(lw.get(node.inputs[0]), lw.trt.ActivationType.SIGMOID)
    return [lw.name(layer, node).get_output(0)]


def gelu(lw: Lowering, node: ir.Node):
    approx = _attr(node, "approximate", "none")
    kind = {"tanh": "GELU_TANH", "none": "GELU_ERF"}[approx]
    layer = lw.net.add_activation(lw.get(node.inputs[0]), getattr(lw.trt.ActivationType, kind))
    return [lw.name(layer, node).get_output(0)]


def split(lw: Lowering, node: ir.Node):
    """Split along the last axis into constant sizes: one slice each, leading dims dynamic."""
    x = lw.get(node.inputs[0])
    rank, axis = len(x.shape), _attr(node, "axis", 0)
    if axis not in (-1, rank - 1):
        raise LoweringError(node, f"split on axis {axis}", "only last-axis splits are lowered")
    lead = lw.dims(x, 0, rank - 1)
    outs, start = [], 0
    for i, size in enumerate(int(s) for s in _static(lw, node, 1)):
        layer = lw.net.add_slice(x, (0,) * (rank - 1) + (start,), (1,) * rank, (1,) * rank)
        layer.set_input(2, lw.concat([lead, lw.int_const([size])]))
        outs.append(lw.name(layer, node, f"/{i}").get_output(0))
        start += size
    return outs


def gather_nd(lw: Lowering, node: ir.Node):
    layer = lw.net.add_gather_v2(lw.get(node.inputs[0]), lw.get(node.inputs[1]), lw.trt.GatherMode.ND)
    layer.num_elementwise_dims = _attr(node, "batch_dims", 0)
    return [lw.name(layer, node).get_output(0)]


def rms_norm(lw: Lowering, node: ir.Node):
    """y = x / sqrt(mean(x^2) + eps) * w, in fp32, cast back: the pattern the builder fuses."""
    trt, net = lw.trt, lw.net
    x = lw.get(node.inputs[0])
    rank = len(x.shape)
    if _attr(node, "axis", -1) not in (-1, rank - 1):
        raise LoweringError(node, "normalisation over more than the last axis", "only last-axis RMSNorm is lowered")
    xf = lw.cast(x, trt.float32)
    sq = net.add_elementwise(xf, xf, trt.ElementWiseOperation.PROD).get_output(0)
    mean = net.add_reduce(sq, trt.ReduceOperation.AVG, 1 << (rank - 1), True).get_output(0)
    eps = lw.constant(np.full((1,) * rank, _attr(node, "epsilon", 1e-5), np.float32), trt_type=trt.float32)
    std = net.add_unary(net.add_elementwise(mean, eps, trt.ElementWiseOperation.SUM).get_output(0), trt.UnaryOperation.SQRT)
    y = net.add_elementwise(xf, std.get_output(0), trt.ElementWiseOperation.DIV).get_output(0)
    w = lw.to_rank(lw.get(node.inputs[1]), rank)
    layer = net.add_elementwise(lw.cast(y, lw.trt_dtype), w, trt.ElementWiseOperation.PROD)
    return [lw.name(layer, node).get_output(0)]


def rotary(lw: Lowering, node: ir.Node):
    """ONNX RotaryEmbedding on x [B, S, n*D] with cos/sin [max_pos, D/2] and position_ids [B, S]."""
    x = lw.get(node.inputs[0])
    n = _attr(node, "num_heads", 0)
    if len(x.shape) != 3 or not n:
        raise LoweringError(node, "only the 3-D form with num_heads is lowered", "rebuild with the kiln frontend")
    d = x.shape[2] // n
    heads = lw.reshape(x, (0, 0, n, d), transpose=(0, 2, 1, 3))  # [B, n, S, D]
    layer = lw.net.add_rotary_embedding(heads, lw.get(node.inputs[1]), lw.get(node.inputs[2]),
                                        bool(_attr(node, "interleaved", 0)), _attr(node, "rotary_embedding_dim", 0))
    layer.set_input(3, lw.get(node.inputs[3]))
    lw.name(layer, node)
    return [lw.reshape(layer.get_output(0), (0, 0, n * d), first=(0, 2, 1, 3))]


def _axes_mask(axes, rank: int) -> int:
    return sum(1 << (int(a) % rank) for a in axes)


def softmax(lw: Lowering, node: ir.Node):
    x = lw.get(node.inputs[0])
    layer = lw.net.add_softmax(x)
    layer.axes = _axes_mask([_attr(node, "axis", -1)], len(x.shape))
    return [lw.name(layer, node).get_output(0)]


def reduce_sum(lw: Lowering, node: ir.Node):
    x = lw.get(node.inputs[0])
    axes = _static(lw, node, 1)
    layer = lw.net.add_reduce(x, lw.trt.ReduceOperation.SUM, _axes_mask(axes, len(x.shape)), bool(_attr(node, "keepdims", 1)))
    return [lw.name(layer, node).get_output(0)]


def topk(lw: Lowering, node: ir.Node):
    """Largest k along the last axis (MoE routing); indices come out int32 in TensorRT."""
    x = lw.get(node.inputs[0])
    if not _attr(node, "largest", 1) or _attr(node, "axis", -1) not in (-1, len(x.shape) - 1):
        raise LoweringError(node, "only the largest k along the last axis is lowered", "use backend: onnxruntime")
    k = int(_static(lw, node, 1).reshape(-1)[0])
    layer = lw.net.add_topk(x, lw.trt.TopKOperation.MAX, k, 1 << (len(x.shape) - 1))
    lw.name(layer, node)
    return [layer.get_output(0), layer.get_output(1)]


def one_hot(lw: Lowering, node: ir.Node):
    values = lw.get(node.inputs[2])  # [off, on]
    depth = lw.int_const(_static(lw, node, 1).reshape(()), np.int32)
    idx = lw.get(node.inputs[0])
    layer = lw.net.add_one_hot(idx, values, depth, _attr(node, "axis", -1))
    return [lw.name(layer, node).get_output(0)]


def shape(lw: Lowering, node: ir.Node):
    return [lw.name(lw.net.add_shape(lw.get(node.inputs[0])), node).get_output(0)]


OPS = {
    "Gather": gather,
    "Transpose": transpose,
    "Reshape": reshape,
    "Unsqueeze": unsqueeze,
    "MatMul": matmul,
    "Add": _elementwise("SUM"),
    "Sub": _elementwise("SUB"),
    "Mul": _elementwise("PROD"),
    "Div": _elementwise("DIV"),
    "Sigmoid": sigmoid,
    "Gelu": gelu,
    "Softmax": softmax,
    "ReduceSum": reduce_sum,
    "TopK": topk,
    "OneHot": one_hot,
    "Shape": shape,
    "Split": split,
    "GatherND": gather_nd,
    "RMSNormalization": rms_norm,
    "RotaryEmbedding": rotary,
}
