"""QDQ lowering: the quantisation passes' DequantizeLinear / QuantizeLinear as TensorRT Q/DQ layers.

Weights: int4 blocks (signed, block along K, scales [K/g, N]), int8 and fp8 per output channel
(scales [N]). Activations: static per-tensor int8 or fp8. Scales take the compute dtype
(TensorRT wants the scale dtype equal to the dequantised output's). int4 weights are packed two
per byte, element 2i in the low nibble of byte i: ONNX's order for int4 tensors.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from compiler.backends.tensorrt.network import Lowering, LoweringError

_FIX = "use int4-awq/int4-rtn with symmetric: true (signed int4), int8-wo, int8-sq or fp8"


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed int4 values (any int array in [-8, 7]) -> uint8 [ceil(n/2)], low nibble first."""
    flat = (np.asarray(q, dtype=np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


def _zero_point_is_zero(lw: Lowering, node: ir.Node) -> bool:
    zp = lw.const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return zp is None or not np.any(np.asarray(zp, dtype=np.float32))


def _weight(lw: Lowering, node: ir.Node, q: ir.Value):
    """The quantised weight as a constant of its TensorRT type."""
    trt, dt = lw.trt, q.dtype
    data = q.const_value.numpy()
    if dt == ir.DataType.INT4:
        return lw.constant(pack_int4(data), trt_type=trt.int4, shape=data.shape, name=f"{q.name}/const")
    if dt == ir.DataType.INT8:
        return lw.constant(np.asarray(data, np.int8), name=f"{q.name}/const")
    if dt == ir.DataType.FLOAT8E4M3FN:
        raw = np.asarray(data, dtype=ml_dtypes.float8_e4m3fn).view(np.uint8)
        return lw.constant(raw, trt_type=trt.fp8, shape=data.shape, name=f"{q.name}/const")
    raise LoweringError(node, f"{dt.name} weights have no TensorRT equivalent (uint4 with a zero point is refused)", _FIX)


def dequantize(lw: Lowering, node: ir.Node):
    x, scale = node.inputs[0], node.inputs[1]
    if not _zero_point_is_zero(lw, node):
        raise LoweringError(node, "a non-zero zero point (TensorRT quantisation is symmetric)", _FIX)
    if x.const_value is None:  # activation: Q -> DQ pair, the Q lowered already
        layer = lw.net.add_dequantize(lw.get(x), lw.get(scale), lw.trt_dtype)
        return [lw.name(layer, node).get_output(0)]
    q = _weight(lw, node, x)
    layer = lw.net.add_dequantize(q, lw.get(scale), lw.trt_dtype)
    block = node.attributes.get("block_size")
    axis = node.attributes.get("axis")
    if block is None or block.value == 0:  # per channel [N] (axis 1) or per tensor
        if len(scale.shape or ()) == 1:
            layer.axis = axis.value if axis is not None else 1
    else:
        K = x.shape[0]
        if K % block.value:
            raise LoweringError(node, f"block size {block.value} does not divide K={K} (TensorRT needs whole blocks)",
                                "pick a group_size that divides every linear's input size (e.g. 64 for K=576)")
        layer.axis = axis.value if axis is not None else 0
    return [lw.name(layer, node).get_output(0)]


def quantize(lw: Lowering, node: ir.Node):
    """Static per-tensor activation quantisation to int8 or fp8."""
    if not _zero_point_is_zero(lw, node):
        raise LoweringError(node, "a non-zero zero point (TensorRT quantisation is symmetric)", _FIX)
    out = node.outputs[0].dtype
    types = {ir.DataType.INT8: lw.trt.int8, ir.DataType.FLOAT8E4M3FN: lw.trt.fp8}
    if out not in types:
        raise LoweringError(node, f"quantising to {out.name}", _FIX)
    layer = lw.net.add_quantize(lw.get(node.inputs[0]), lw.get(node.inputs[1]), types[out])
    return [lw.name(layer, node).get_output(0)]


OPS = {"DequantizeLinear": dequantize, "QuantizeLinear": quantize}
