"""Static-cache attention -> com.microsoft.GroupQueryAttention (ONNX Runtime's fused CPU kernel).

Pattern (built by compiler/frontend/layers.cached_attention), per layer:
  q4 = Transpose(Reshape(q))                      q  [B, S, Nq*D] (after rotary)
  present_k = TensorScatter(past_k, Transpose(Reshape(k)), write_index)
  present_v = TensorScatter(past_v, Transpose(Reshape(v)), write_index)
  y = Reshape(Transpose(Attention(q4, present_k, present_v, mask)))      y [B, S, Nq*D]
Replacement: GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_len) with the cache
buffers shared (the runtime binds past and present to one buffer), which attends only over
each row's real length instead of the whole static cache.
Check: refuses when the mask is not the graph's causal (or sliding-window) mask, when the
cache update is not a TensorScatter on axis 2. A scale other than 1/sqrt(D) (Gemma 3's
query_pre_attn_scalar) is passed through GQA's `scale` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

_DOMAIN = "com.microsoft"


@dataclass
class Match:
    attention: ir.Node
    q: ir.Value
    k: ir.Value
    v: ir.Value
    scatters: tuple[ir.Node, ir.Node]
    merge: ir.Node  # the Reshape producing y [B, S, Nq*D]
    window: int
    packed: tuple[ir.Value, ir.Value, ir.Value] | None = None  # qkv [B, S, (Nq+2Nkv)*D], cos, sin


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


def _through(value: ir.Value, *ops: str) -> ir.Value | None:
    """Walk producers back through `ops` (nearest first); the value before them, or None."""
    for op in ops:
        node = value.producer()
        if node is None or node.op_type != op:
            return None
        value = node.inputs[0]
    return value


def match(node: ir.Node) -> Match | None:
    if node.op_type != "Attention" or len(node.inputs) < 4:
        return None
    q4, pk, pv, mask = node.inputs[:4]
    sk, sv = pk.producer(), pv.producer()
    if not (sk and sv and sk.op_type == sv.op_type == "TensorScatter"):
        return None
    q, k, v = _through(q4, "Transpose", "Reshape"), _through(sk.inputs[1], "Transpose", "Reshape"), _through(sv.inputs[1], "Transpose", "Reshape")
    users = list(node.outputs[0].uses())
    if None in (q, k, v) or len(users) != 1 or users[0].node.op_type != "Transpose":
        return None
    merge_users = list(users[0].node.outputs[0].uses())
    if len(merge_users) != 1 or merge_users[0].node.op_type != "Reshape":
        return None
    return Match(node, q, k, v, (sk, sv), merge_users[0].node, _window(mask), _packed(q, k, v))


def _window(mask: ir.Value) -> int:
    """-1 for the causal mask; the window size for the sliding-window mask; -2 if unknown."""
    node = mask.producer()
    if node is not None and node.op_type == "LessOrEqual":
        return -1
    if node is not None and node.op_type == "And":
        inside = node.inputs[1].producer()
        sub = inside.inputs[1].producer() if inside is not None else None
        if sub is not None and sub.op_type == "Sub" and sub.inputs[1].const_value is not None:
            return int(sub.inputs[1].const_value.numpy().reshape(-1)[0])
    return -2


def check(m: Match, head_dim: int) -> str | None:
    if m.window == -2:
        return "attention mask is not the causal or sliding-window mask"
    if any(s.attributes.get_int("axis", -2) not in (2, -2) for s in m.scatters):
        return "cache update is not on the sequence axis"
    return None


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


def replace(graph: ir.Graph, m: Match, heads: tuple[int, int], lens: tuple[ir.Value, ir.Value]) -> None:
    nq, nkv = heads
    past_k, past_v = m.scatters[0].inputs[0], m.scatters[1].inputs[0]
    name = m.attention.name.rsplit("/", 1)[0] + "/GroupQueryAttention"
    if m.packed:  # GQA rotates q/k itself at positions 0..S-1 (prefill) or seqlens_k (decode)
        qkv, cos, sin = m.packed
        inputs = [qkv, None, None, past_k, past_v, *lens, cos, sin]
    else:
        inputs = [m.q, m.k, m.v, past_k, past_v, *lens]
    attrs = [ir.AttrInt64("num_heads", nq), ir.AttrInt64("kv_num_heads", nkv),
             ir.AttrInt64("local_window_size", m.window), ir.AttrInt64("do_rotary", int(bool(m.packed)))]
    scale = m.attention.attributes.get_float("scale", 0.0)
    if scale:
        attrs.append(ir.AttrFloat32("scale", scale))
    gqa = ir.Node(_DOMAIN, "GroupQueryAttention", inputs, attributes=attrs, num_outputs=3, name=name)
    graph.insert_before(m.attention, gqa)
    y, present_k, present_v = gqa.outputs
    y.name = f"{name}_output_0"
    for new, old in ((y, m.merge.outputs[0]), (present_k, m.scatters[0].outputs[0]), (present_v, m.scatters[1].outputs[0])):
        new.type, new.shape = old.type, old.shape
    m.merge.outputs[0].replace_all_uses_with(y)
    for old, new in ((m.scatters[0].outputs[0], present_k), (m.scatters[1].outputs[0], present_v)):
        idx = graph.outputs.index(old)
        new.name, old.name = old.name, old.name + "_replaced"
        graph.outputs[idx] = new
        old.replace_all_uses_with(new)
