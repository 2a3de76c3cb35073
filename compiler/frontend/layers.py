"""Graph pieces shared by the decoder architectures, in standard ONNX ops (opset 24).

Shapes in comments: B batch, S new tokens this call, M max sequence (static KV cache),
H hidden, Nq/Nkv query/KV heads, D head dim, I intermediate, V vocab.

The KV cache is static: `past_key.i` [B, Nkv, M, D] is a graph input, TensorScatter writes this
call's keys at each sequence's write index, and the result is the output `present_key.i`. The
runtime binds input and output to one buffer, so the cache is updated in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler.ir.builder import GraphBuilder


@dataclass
class DecoderInputs:
    """Values every layer reads, built once per graph."""

    position_ids: ir.Value  # [B, S] int64
    write_index: ir.Value  # [B] int64, where this call's first token lands in the cache
    mask: ir.Value  # [B, 1, S, M] bool, True = may attend
    window_mask: ir.Value | None  # same, with the sliding window applied
    cos: ir.Value  # [M, R/2], R = rotary dims of a head
    sin: ir.Value  # [M, R/2]
    rotary_dim: int  # R; < D rotates only the first R dims of each head
    local: tuple[ir.Value, ir.Value] | None = None  # cos/sin of sliding-window layers (Gemma 3)


def decoder_inputs(b: GraphBuilder, max_seq: int, rotary: tuple[np.ndarray, np.ndarray], window: int | None,
                   local_rotary: tuple[np.ndarray, np.ndarray] | None = None) -> DecoderInputs:
    position_ids = b.input("position_ids", ir.DataType.INT64, ["batch", "seq"])
    with b.scope("inputs"):
        first = b.op("Slice", [position_ids, b.const(np.array([0]), "starts"), b.const(np.array([1]), "ends"),
                               b.const(np.array([1]), "axes")], "first_position")
        write_index = b.op("Reshape", [first, b.const(np.array([-1]), "flat")], "write_index")  # [B]
        query_pos = b.op("Unsqueeze", [position_ids, b.const(np.array([1, 3]), "axes_q")], "query_pos")  # [B,1,S,1]
        key_pos = b.const(np.arange(max_seq, dtype=np.int64), "key_pos")  # [M]
        mask = b.op("LessOrEqual", [key_pos, query_pos], "causal_mask")  # [B,1,S,M]
        window_mask = None
        if window is not None and window < max_seq:
            lowest = b.op("Sub", [query_pos, b.const(np.array(window, dtype=np.int64), "window")], "window_start")
            inside = b.op("Greater", [key_pos, lowest], "in_window")
            window_mask = b.op("And", [mask, inside], "window_mask")
        cos = b.const(rotary[0], "cos_cache")
        sin = b.const(rotary[1], "sin_cache")
        local = None
        if local_rotary is not None:
            local = (b.const(local_rotary[0], "local_cos_cache"), b.const(local_rotary[1], "local_sin_cache"))
    return DecoderInputs(position_ids, write_index, mask, window_mask, cos, sin, 2 * rotary[0].shape[1], local)


def rms_norm(b: GraphBuilder, x: ir.Value, weight: ir.Value, eps: float) -> ir.Value:
    return b.op("RMSNormalization", [x, weight], "RMSNormalization", axis=-1, epsilon=eps)


def linear(b: GraphBuilder, x: ir.Value, weight: ir.Value, bias: ir.Value | None = None) -> ir.Value:
    """x [.., in] @ weight [in, out] (+ bias [out])."""
    y = b.op("MatMul", [x, weight])
    return b.op("Add", [y, bias]) if bias is not None else y


def split_heads(b: GraphBuilder, x: ir.Value, heads: int, head_dim: int, leaf: str) -> ir.Value:
    """[B, S, N*D] -> [B, N, S, D]. The head count is left to the Reshape (-1): a tensor-parallel
    rank's graph holds N / tp heads without touching this constant."""
    x4 = b.op("Reshape", [x, b.const(np.array([0, 0, -1, head_dim]), "heads_shape")], f"{leaf}_reshape")
    return b.op("Transpose", [x4], f"{leaf}_transpose", perm=[0, 2, 1, 3])


def rotary(b: GraphBuilder, x: ir.Value, inp: DecoderInputs, heads: int, head_dim: int, leaf: str, local: bool = False) -> ir.Value:
    """RotaryEmbedding on [B, S, N*D] (non-interleaved halves, as transformers' rotate_half);
    partial rotary (R < D) rotates the first R dims of each head and passes the rest."""
    cos, sin = inp.local if local and inp.local is not None else (inp.cos, inp.sin)
    attrs = {"num_heads": heads, "interleaved": 0}
    if inp.rotary_dim != head_dim:
        attrs["rotary_embedding_dim"] = inp.rotary_dim
    return b.op("RotaryEmbedding", [x, cos, sin, inp.position_ids], leaf, **attrs)


def head_norm(b: GraphBuilder, x: ir.Value, weight: ir.Value, heads: int, head_dim: int, eps: float, leaf: str) -> ir.Value:
    """RMSNorm of each head: [B, S, N*D] -> [B, S, N, D] -> norm over D (weight [D]) -> [B, S, N*D]."""
    x4 = b.op("Reshape", [x, b.const(np.array([0, 0, -1, head_dim]), "heads_shape")], f"{leaf}_split_heads")
    y = b.op("RMSNormalization", [x4, weight], leaf, axis=-1, epsilon=eps)
    return b.op("Reshape", [y, b.const(np.array([0, 0, -1]), "merge_shape")], f"{leaf}_merge_heads")


def cached_attention(
    b: GraphBuilder,
    q: ir.Value,  # [B, S, Nq*D] after rotary
    k: ir.Value,  # [B, S, Nkv*D] after rotary
    v: ir.Value,  # [B, S, Nkv*D]
    past_k: ir.Value,  # [B, Nkv, M, D]
    past_v: ir.Value,
    inp: DecoderInputs,
    heads: tuple[int, int, int],  # Nq, Nkv, D
    sliding: bool = False,
    scale: float | None = None,  # default 1/sqrt(D)
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Returns attention output [B, S, Nq*D] and the updated caches."""
    nq, nkv, d = heads
    q4 = split_heads(b, q, nq, d, "q")
    k4 = split_heads(b, k, nkv, d, "k")
    v4 = split_heads(b, v, nkv, d, "v")
    present_k = b.op("TensorScatter", [past_k, k4, inp.write_index], "k_cache_update", axis=2)
    present_v = b.op("TensorScatter", [past_v, v4, inp.write_index], "v_cache_update", axis=2)
    mask = inp.window_mask if sliding and inp.window_mask is not None else inp.mask
    y = b.op("Attention", [q4, present_k, present_v, mask], "Attention", scale=scale or 1.0 / math.sqrt(d))  # [B,Nq,S,D]
    y = b.op("Transpose", [y], "merge_transpose", perm=[0, 2, 1, 3])
    y = b.op("Reshape", [y, b.const(np.array([0, 0, -1]), "merge_shape")], "merge_reshape")
    return y, present_k, present_v


def gated_mlp(b: GraphBuilder, gate: ir.Value, up: ir.Value, act: str = "silu") -> ir.Value:
    """act(gate) * up, [B, S, I]. SiLU as x * Sigmoid(x): ONNX Runtime 1.31 has no Swish-24 kernel
    (it inlines Swish with a Cast per layer) but fuses this pair into one kernel. gelu_tanh is
    Gelu-20 with approximate="tanh" (Gemma's gelu_pytorch_tanh)."""
    if act == "gelu_tanh":
        a = b.op("Gelu", [gate], "act", approximate="tanh")
    else:
        sig = b.op("Sigmoid", [gate], "act_sigmoid")
        a = b.op("Mul", [gate, sig], "act")
    return b.op("Mul", [a, up], "gate_mul")


def select_positions(b: GraphBuilder, x: ir.Value) -> ir.Value:
    """x [B, S, H] -> [B, K, H] at input `logits_positions` [B, K] (indices into S).

    Prefill asks for each row's last real token only, which skips K/S of the lm_head work."""
    positions = b.input("logits_positions", ir.DataType.INT64, ["batch", "logits"])
    with b.scope("select"):
        idx = b.op("Unsqueeze", [positions, b.const(np.array([-1]), "last_axis")], "indices")  # [B, K, 1]
        return b.op("GatherND", [x, idx], "GatherND", batch_dims=1)
