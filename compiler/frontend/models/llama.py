"""Llama (`LlamaForCausalLM`): SmolLM2, Llama 2 and Llama 3.x (incl. `llama3` rope scaling).

The decoder graph built here also serves Mistral and Qwen2, whose files only read their own
configs: the differences (qkv bias, sliding window) are config fields, not code copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from compiler.frontend import layers as L
from compiler.frontend.checkpoint import Checkpoint
from compiler.frontend.rope import RopeConfig
from compiler.frontend.weights import Weights
from compiler.ir.builder import GraphBuilder

# Checkpoint names, as data. `{i}` is the layer index; graph scopes mirror the keys.
WEIGHTS = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "attn/q_proj": "model.layers.{i}.self_attn.q_proj",
    "attn/k_proj": "model.layers.{i}.self_attn.k_proj",
    "attn/v_proj": "model.layers.{i}.self_attn.v_proj",
    "attn/o_proj": "model.layers.{i}.self_attn.o_proj",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp/gate_proj": "model.layers.{i}.mlp.gate_proj",
    "mlp/up_proj": "model.layers.{i}.mlp.up_proj",
    "mlp/down_proj": "model.layers.{i}.mlp.down_proj",
}


def need(cfg: dict, key: str, arch: str):
    """Read a config key kiln relies on; refuse the config (naming the key) when it is absent."""
    if key not in cfg or cfg[key] is None:
        raise KilnError(f"config.json of {arch} lacks {key}", f"add {key} to config.json")
    return cfg[key]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict, arch: str = "LlamaForCausalLM", **overrides) -> "LlamaConfig":
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise KilnError(f"config.json of {arch}: hidden_act {act!r} is not supported", "kiln builds silu (SwiGLU) MLPs")
        hidden, heads = int(need(cfg, "hidden_size", arch)), int(need(cfg, "num_attention_heads", arch))
        kw = dict(
            vocab_size=int(need(cfg, "vocab_size", arch)),
            hidden_size=hidden,
            intermediate_size=int(need(cfg, "intermediate_size", arch)),
            num_layers=int(need(cfg, "num_hidden_layers", arch)),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(need(cfg, "rms_norm_eps", arch)),
            rope=RopeConfig.from_hf(cfg, f"config.json of {arch}"),
            max_position_embeddings=int(need(cfg, "max_position_embeddings", arch)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )
        kw.update(overrides)
        c = cls(**kw)
        if c.num_heads % c.num_kv_heads:
            raise KilnError(f"config.json of {arch}: {c.num_heads} heads do not divide into {c.num_kv_heads} KV heads",
                            "fix num_key_value_heads")
        return c

    @property
    def kv_shape(self) -> tuple[int, int]:
        return self.num_kv_heads, self.head_dim


def _proj(b: GraphBuilder, w: Weights, x: ir.Value, key: str, i: int, shape: tuple[int, int], bias: bool) -> ir.Value:
    base = WEIGHTS[key].format(i=i)
    with b.scope(key.split("/")[-1]):
        weight = w.get(base + ".weight", shape, transpose=True)
        b_val = w.get(base + ".bias", (shape[0],)) if bias else None
        return L.linear(b, x, weight, b_val)


def _layer(b: GraphBuilder, w: Weights, c: LlamaConfig, i: int, x: ir.Value, inp: L.DecoderInputs,
           past: tuple[ir.Value, ir.Value]) -> tuple[ir.Value, ir.Value, ir.Value]:
    """One decoder layer: x [B, S, H] -> x [B, S, H], present k/v."""
    H, D, nq, nkv = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
    with b.scope("attn_norm"):
        h = L.rms_norm(b, x, w.get(WEIGHTS["attn_norm"].format(i=i), (H,)), c.rms_norm_eps)
    with b.scope("attn"):
        q = _proj(b, w, h, "attn/q_proj", i, (nq * D, H), c.attention_bias)
        k = _proj(b, w, h, "attn/k_proj", i, (nkv * D, H), c.attention_bias)
        v = _proj(b, w, h, "attn/v_proj", i, (nkv * D, H), c.attention_bias)
        q = L.rotary(b, q, inp, nq, "q_rotary")
        k = L.rotary(b, k, inp, nkv, "k_rotary")
        y, pk, pv = L.cached_attention(b, q, k, v, past[0], past[1], inp, (nq, nkv, D), sliding=c.sliding_window is not None)
        y = _proj(b, w, y, "attn/o_proj", i, (H, nq * D), False)
    x = b.op("Add", [x, y], "attn_residual")
    with b.scope("mlp_norm"):
        h = L.rms_norm(b, x, w.get(WEIGHTS["mlp_norm"].format(i=i), (H,)), c.rms_norm_eps)
    with b.scope("mlp"):
        gate = _proj(b, w, h, "mlp/gate_proj", i, (c.intermediate_size, H), c.mlp_bias)
        up = _proj(b, w, h, "mlp/up_proj", i, (c.intermediate_size, H), c.mlp_bias)
        y = _proj(b, w, L.swiglu(b, gate, up), "mlp/down_proj", i, (H, c.intermediate_size), c.mlp_bias)
    return b.op("Add", [x, y], "mlp_residual"), pk, pv


def build(c: LlamaConfig, ckpt: Checkpoint, max_seq: int) -> ir.Model:
    """The decoder graph: input_ids, position_ids, logits_positions, past caches -> logits, present caches."""
    b = GraphBuilder("kiln_decoder")
    w = Weights(ckpt, b)
    input_ids = b.input("input_ids", ir.DataType.INT64, ["batch", "seq"])
    inp = L.decoder_inputs(b, max_seq, c.rope.tables(c.head_dim, max_seq), c.sliding_window)
    cache_shape = ["batch", c.num_kv_heads, max_seq, c.head_dim]
    pasts = [(b.input(f"past_key.{i}", ir.DataType.FLOAT, cache_shape), b.input(f"past_value.{i}", ir.DataType.FLOAT, cache_shape))
             for i in range(c.num_layers)]
    with b.scope("embed"):
        x, table = _embed(b, w, c, input_ids)
    presents = []
    for i in range(c.num_layers):
        with b.scope(f"layers.{i}"):
            x, pk, pv = _layer(b, w, c, i, x, inp, pasts[i])
        presents.append((pk, pv))
    x = L.select_positions(b, x)  # [B, K, H]: only the positions whose logits are wanted
    with b.scope("norm"):
        x = L.rms_norm(b, x, w.get(WEIGHTS["norm"], (c.hidden_size,)), c.rms_norm_eps)
    with b.scope("lm_head"):
        logits = L.linear(b, x, table)  # [B, K, V]
    b.output(logits, "logits")
    for i, (pk, pv) in enumerate(presents):
        b.output(pk, f"present_key.{i}")
        b.output(pv, f"present_value.{i}")
    return b.model()


def _embed(b: GraphBuilder, w: Weights, c: LlamaConfig, input_ids: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Token embeddings [B, S, H] and the lm_head table [H, V] for MatMul (faster than Gemm transB on CPU).

    Tied embeddings keep one [H, V] copy: the lookup gathers its columns and transposes."""
    tied = c.tie_word_embeddings or not w.has(WEIGHTS["lm_head"])
    if tied and not c.tie_word_embeddings:
        raise KilnError(f"checkpoint {w.ckpt.root} lacks weight {WEIGHTS['lm_head']}",
                        "use the complete checkpoint, or set tie_word_embeddings in config.json")
    if tied:
        table = w.get(WEIGHTS["embed"], (c.vocab_size, c.hidden_size), transpose=True)  # [H, V]
        cols = b.op("Gather", [table, input_ids], "Gather", axis=1)  # [H, B, S]
        return b.op("Transpose", [cols], "Transpose", perm=[1, 2, 0]), table
    embed = w.get(WEIGHTS["embed"], (c.vocab_size, c.hidden_size))
    table = w.get(WEIGHTS["lm_head"], (c.vocab_size, c.hidden_size), transpose=True)
    return b.op("Gather", [embed, input_ids], "Gather", axis=0), table

ARCH = "LlamaForCausalLM"


def config(cfg: dict) -> LlamaConfig:
    return LlamaConfig.from_hf(cfg, ARCH)
