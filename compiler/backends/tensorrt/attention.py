"""The static KV cache and attention: TensorScatter-24 -> KV-cache update, Attention -> TensorRT's
fused attention with GQA and real per-sequence KV lengths.

The IR writes S new keys at `write_index` [B] (each row's first position) into the cache input
past_key.i [B, Nkv, M, D] and attends with a causal mask over all M slots. TensorRT updates the
cache input in place (the runtime binds past and present to one buffer) and attends over the
first L_b = position_ids[b, S-1] + 1 slots of each row with the causal mask aligned lower-right,
which is the same set of keys the IR's mask allows (key_pos <= query_pos). A sliding-window mask
has no TensorRT equivalent here: refused with the way around it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.backends.tensorrt.network import Lowering, LoweringError

# head sizes TensorRT's fused attention kernels do not cover in fp16/bf16: they take the
# decomposed (MatMul-softmax-MatMul) form
_DECOMPOSE_HEAD_DIMS = {8, 512, 1024}


def check(graph: ir.Graph, num_heads: int, num_kv_heads: int, head_dim: int) -> str | None:
    """The rules TensorRT's attention imposes, checked before any build work."""
    if num_heads % num_kv_heads:
        return f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads}) for TensorRT's GQA"
    for node in graph:
        if node.op_type == "Attention":
            mask = node.inputs[3].producer() if len(node.inputs) > 3 and node.inputs[3] is not None else None
            if mask is None or mask.op_type != "LessOrEqual":
                return (f"{node.name} uses a sliding-window (or non-causal) mask; TensorRT's attention takes a "
                        "causal mask with per-sequence lengths only")
    return None


def _positions(lw: Lowering):
    return lw.inputs["position_ids"]  # int32 [B, S]


def _column(lw: Lowering, pos, last: bool):
    """position_ids[:, 0] or [:, S-1] as int32 [B]."""
    net = lw.net
    batch = lw.dims(pos, 0, 1)
    layer = net.add_slice(pos, (0, 0), (1, 1), (1, 1))
    if last:
        seq = lw.dims(pos, 1, 2)
        start = net.add_elementwise(seq, lw.int_const([1]), lw.trt.ElementWiseOperation.SUB).get_output(0)
        layer.set_input(1, lw.concat([lw.int_const([0]), start]))
    layer.set_input(2, lw.concat([batch, lw.int_const([1])]))
    return lw.reshape(layer.get_output(0), (-1,))


def kv_update(lw: Lowering, node: ir.Node):
    """TensorScatter(past [B,Nkv,M,D], update [B,Nkv,S,D], write_index [B], axis=2)."""
    past = node.inputs[0]
    if past.name not in lw.inputs:
        raise LoweringError(node, "the cache must be a graph input (a static KV cache)", "rebuild with the kiln frontend")
    axis, mode = node.attributes.get("axis"), node.attributes.get("mode")
    if axis is None or axis.value != 2 or (mode is not None and mode.value != "linear"):
        raise LoweringError(node, "only a linear update along the sequence axis is lowered", "rebuild with the kiln frontend")
    idx_node = node.inputs[2].producer()
    if idx_node is None or not idx_node.name.endswith("write_index"):
        raise LoweringError(node, "the write index must be each row's first position", "rebuild with the kiln frontend")
    if "write_idx" not in lw.shared:
        lw.shared["write_idx"] = _column(lw, _positions(lw), last=False)
    layer = lw.net.add_kv_cache_update(lw.inputs[past.name], lw.get(node.inputs[1]), lw.shared["write_idx"],
                                       lw.trt.KVCacheMode.LINEAR)
    return [lw.name(layer, node).get_output(0)]


def attention(lw: Lowering, node: ir.Node):
    """Attention(q [B,Nq,S,D], k_cache, v_cache, causal mask) with q pre-scaled by `scale`."""
    trt, net = lw.trt, lw.net
    q = lw.get(node.inputs[0])
    head_dim = q.shape[3]
    scale = node.attributes.get("scale")
    scale = scale.value if scale is not None else 1.0 / np.sqrt(head_dim)
    qs = net.add_elementwise(q, lw.constant(np.full((1, 1, 1, 1), scale, np.float32)), trt.ElementWiseOperation.PROD)
    layer = net.add_attention_v2(qs.get_output(0), lw.get(node.inputs[1]), lw.get(node.inputs[2]),
                                 trt.AttentionNormalizationOp.SOFTMAX, trt.CausalMaskKind.LOWER_RIGHT)
    if "kv_lengths" not in lw.shared:
        last = _column(lw, _positions(lw), last=True)
        lw.shared["kv_lengths"] = net.add_elementwise(last, lw.int_const([1], np.int32), trt.ElementWiseOperation.SUM).get_output(0)
    layer.key_value_lengths = lw.shared["kv_lengths"]
    if head_dim in _DECOMPOSE_HEAD_DIMS:
        layer.decomposable = True
    return [lw.name(layer, node).get_output(0)]


OPS = {"TensorScatter": kv_update, "Attention": attention}
