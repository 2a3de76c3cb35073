"""Static-cache attention -> com.microsoft.GroupQueryAttention (ONNX Runtime's fused CPU kernel).

Ours: onnxscript's GQA fusions match the attention of a torch export (MatMul/Softmax or SDPA,
the cache grown by Concat); kiln's graph keeps a static cache written by TensorScatter and the
standard Attention op, which no rule of theirs matches.
  Pattern (built by compiler/frontend/layers.cached_attention), per layer:
    q4 = Transpose(Reshape(q))                      q  [B, S, Nq*D] (after rotary)
    present_k = TensorScatter(past_k, Transpose(Reshape(k)), write_index)
    present_v = TensorScatter(past_v, Transpose(Reshape(v)), write_index)
    y = Reshape(Transpose(Attention(q4, present_k, present_v, mask)))      y [B, S, Nq*D]
  Replacement: GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_len) with the cache
  buffers shared (the runtime binds past and present to one buffer), which attends only over
  each row's real length instead of the whole static cache. When q/k/v are the rotated parts of
  one merged QKV projection, GQA takes the packed projection and rotates itself.
  Check: refuses when the mask is not the graph's causal or sliding-window mask, or when the
  cache update is not a TensorScatter on axis 2. A scale other than 1/sqrt(D) (Gemma 3's
  query_pre_attn_scalar) is passed through GQA's `scale` attribute.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

_DOMAIN = "com.microsoft"


def _packed(q: ir.Value, k: ir.Value, v: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """When q/k are RotaryEmbedding of Split outputs 0/1 and v is output 2 of the same Split
    (the merged QKV projection), GQA can take the packed projection and rotate itself."""
    rq, rk, split = q.producer(), k.producer(), v.producer()
    if not (rq and rk and split and rq.op_type == rk.op_type == "RotaryEmbedding" and split.op_type == "Split"):
        return None
    if [rq.inputs[0], rk.inputs[0], v] != list(split.outputs) or rq.inputs[1:] != rk.inputs[1:]:
        return None
    if any(r.attributes.get_int("interleaved", 0) or r.attributes.get_int("rotary_embedding_dim", 0) for r in (rq, rk)):
        return None
    return split.inputs[0], rq.inputs[1], rq.inputs[2]


CAUSAL = -1  # GroupQueryAttention's local_window_size when every earlier position is attended


def window_of(mask: ir.Value) -> int | None:
    """CAUSAL for the graph's causal mask, the window size for its sliding-window mask, None otherwise."""
    node = mask.producer()
    if node is not None and node.op_type == "LessOrEqual":
        return CAUSAL
    if node is not None and node.op_type == "And":
        inside = node.inputs[1].producer()
        sub = inside.inputs[1].producer() if inside is not None else None
        if sub is not None and sub.op_type == "Sub" and sub.inputs[1].const_value is not None:
            return int(sub.inputs[1].const_value.numpy().reshape(-1)[0])
    return None


def cached_attention(op, q, k, v, past_k, past_v, write_index, mask, q_shape, k_shape, v_shape, y_shape):
    """The pattern of compiler/frontend/layers.cached_attention (this fusion's and kiln::PagedAttention's)."""
    def heads(x, shape):  # [B, S, N*D] -> [B, N, S, D]
        return op.Transpose(op.Reshape(x, shape, _allow_other_attributes=True), _allow_other_attributes=True)

    present_k = op.TensorScatter(past_k, heads(k, k_shape), write_index, _allow_other_attributes=True, _outputs=["present_k"])
    present_v = op.TensorScatter(past_v, heads(v, v_shape), write_index, _allow_other_attributes=True, _outputs=["present_v"])
    attended = op.Attention(heads(q, q_shape), present_k, present_v, mask, _allow_other_attributes=True, _outputs=["attended"])
    y = op.Reshape(op.Transpose(attended, _allow_other_attributes=True), y_shape, _allow_other_attributes=True)
    return y, present_k, present_v


def refusal(mask: ir.Value, present_k: ir.Value, present_v: ir.Value) -> str | None:
    """Why a match of cached_attention cannot become a kernel that attends over each row's length."""
    if window_of(mask) is None:
        return "attention mask is not the causal or sliding-window mask"
    if any(v.producer().attributes.get_int("axis", -2) not in (2, -2) for v in (present_k, present_v)):
        return "cache update is not on the sequence axis"
    return None


class GroupQueryAttentionFusion(pattern.RewriteRuleClassBase):
    """Static-cache Attention + TensorScatter cache writes -> GroupQueryAttention."""

    def __init__(self, heads: tuple[int, int], lens: tuple[ir.Value, ir.Value], refused: list[str]):
        super().__init__("GroupQueryAttention")
        self.heads, self.lens, self.refused = heads, lens, refused

    def pattern(self, op, q, k, v, past_k, past_v, write_index, mask, q_shape, k_shape, v_shape, y_shape):
        return cached_attention(op, q, k, v, past_k, past_v, write_index, mask, q_shape, k_shape, v_shape, y_shape)

    def check(self, context, mask, present_k, present_v, attended, **_) -> pattern.MatchResult:
        result, name = pattern.MatchResult(), attended.producer().name
        why = refusal(mask, present_k, present_v)
        if why:
            self.refused.append(f"GroupQueryAttention: {name} refused: {why}")
            return result.fail(why)
        return result

    def rewrite(self, op, q, k, v, past_k, past_v, mask, attended, **_):
        nq, nkv = self.heads
        attention = attended.producer()
        packed = _packed(q, k, v)
        if packed:  # GQA rotates q/k itself at positions 0..S-1 (prefill) or seqlens_k (decode)
            qkv, cos, sin = packed
            inputs = [qkv, None, None, past_k, past_v, *self.lens, cos, sin]
        else:
            inputs = [q, k, v, past_k, past_v, *self.lens]
        attrs = {"num_heads": nq, "kv_num_heads": nkv, "local_window_size": window_of(mask), "do_rotary": int(bool(packed))}
        scale = attention.attributes.get_float("scale", 0.0)
        if scale:
            attrs["scale"] = scale
        name = attention.name.replace("/Attention", "/GroupQueryAttention")
        y, present_k, present_v = op.GroupQueryAttention(*inputs, **attrs, _domain=_DOMAIN, _outputs=3, _name=name)
        return y, present_k, present_v


def lengths(graph: ir.Graph, position_ids: ir.Value) -> tuple[ir.Value, ir.Value]:
    """seqlens_k [B] int32 (= last position of each row) and total_sequence_length (scalar int32)."""
    def const(name, arr):
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(arr.shape), const_value=ir.Tensor(arr, name=name))
        graph.register_initializer(v)
        return v

    last = ir.Node("", "Gather", [position_ids, const("/gqa/last", np.array(-1))], attributes=[ir.AttrInt64("axis", 1)], name="/gqa/last_position")
    seqlens = ir.Node("", "Cast", [last.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.INT32)], name="/gqa/seqlens_k")
    top = ir.Node("", "ReduceMax", [position_ids], attributes=[ir.AttrInt64("keepdims", 0)], name="/gqa/max_position")
    plus = ir.Node("", "Add", [top.outputs[0], const("/gqa/one", np.array(1))], name="/gqa/total_length64")
    total = ir.Node("", "Cast", [plus.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.INT32)], name="/gqa/total_length")
    nodes = [last, seqlens, top, plus, total]
    for n in nodes:
        n.outputs[0].name = f"{n.name}_output_0"
    graph.insert_before(graph.node(0), nodes)
    return seqlens.outputs[0], total.outputs[0]


def rules(graph: ir.Graph, cfg, refused: list[str]) -> list[pattern.RewriteRuleSet]:
    """The fusion, with the graph's seqlens_k / total_length made once for every layer to share
    (removed again by dead-code elimination when no layer matched); none for a graph without a
    KV cache (an encoder)."""
    positions = next((v for v in graph.inputs if v.name == "position_ids"), None)
    if positions is None or not any(n.op_type == "TensorScatter" for n in graph):
        return []
    lens = lengths(graph, positions)
    return [pattern.RewriteRuleSet([GroupQueryAttentionFusion.rule((cfg.num_heads, cfg.num_kv_heads), lens, refused)])]
