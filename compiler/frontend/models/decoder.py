"""The decoder graph of every causal LM kiln builds: Llama, Mistral, Qwen2, Qwen3, Phi-3,
Gemma 3 and the MoE decoders (Mixtral, Qwen3-MoE).

Each architecture's file reads its own config.json into a `DecoderConfig` and names its
checkpoint weights: the differences (qkv bias, sliding windows per layer, q/k norms, fused
checkpoint projections, Gemma's (1 + w) and sandwich norms, GELU-tanh, scaled embeddings,
routed experts) are config fields and name maps, not code copies. Llama's names are the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from compiler.frontend import layers as L
from compiler.frontend.moe import MoeConfig, moe_mlp
from compiler.frontend.checkpoint import Checkpoint
from compiler.frontend.config_fields import flag, integer, number
from compiler.frontend.rope import RopeConfig
from compiler.frontend.sharding import ShardSpec
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
    # only read when the config asks for them (Qwen3, Gemma 3)
    "attn/q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "attn/k_norm": "model.layers.{i}.self_attn.k_norm.weight",
}

# Checkpoint tensors the graph may leave unread: rotary buffers of old exports; lm_head.weight
# saved beside tied embeddings (transformers ties it to the embeddings and ignores it too)
IGNORED_WEIGHTS = ("*.rotary_emb.inv_freq", "lm_head.weight")

# Tensor parallelism, as data (see compiler/frontend/sharding.py): by the projection's role in its layer.
SHARDS = (
    *(ShardSpec(f"attn.{p}", "column") for p in ("q_proj", "k_proj", "v_proj", "qkv_proj")),
    ShardSpec("attn.o_proj", "row"),
    *(ShardSpec(f"mlp.{p}", "column") for p in ("gate_proj", "up_proj", "gate_up_proj")),
    ShardSpec("mlp.down_proj", "row"),
)


@dataclass(frozen=True)
class DecoderConfig:
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
    sliding_layers: tuple[bool, ...] | None = None  # per layer; None = every layer when a window is set
    local_rope: RopeConfig | None = None  # rope of the sliding layers when it differs (Gemma 3)
    qk_norm: bool = False  # RMSNorm of each q/k head before rotary (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # added to every RMSNorm weight (Gemma stores w - 1)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 3)
    hidden_act: str = "silu"  # "silu" | "gelu_tanh"
    embed_scale: float | None = None  # embeddings multiplied by it (Gemma: sqrt(hidden))
    query_scale: float | None = None  # attention scale; None = 1/sqrt(head_dim)
    fused_qkv: bool = False  # the checkpoint holds one qkv_proj (Phi-3)
    fused_gate_up: bool = False  # the checkpoint holds one gate_up_proj, gate first (Phi-3)
    moe: MoeConfig | None = None  # routed experts instead of the MLP (Mixtral, Qwen3-MoE)

    @classmethod
    def from_hf(cls, cfg: dict, arch: str, **overrides) -> "DecoderConfig":
        act = overrides.get("hidden_act", cfg.get("hidden_act", "silu"))
        if act not in ("silu", "gelu_tanh"):
            raise KilnError(f"config.json of {arch}: hidden_act {act!r} is not supported", "kiln builds silu or gelu_tanh gated MLPs")
        where = f"config.json of {arch}"
        heads = integer(cfg, "num_attention_heads", where)
        hidden = integer(cfg, "hidden_size", where)
        kw = dict(
            vocab_size=integer(cfg, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=integer(cfg, "intermediate_size", where),
            num_layers=integer(cfg, "num_hidden_layers", where),
            num_heads=heads,
            num_kv_heads=integer(cfg, "num_key_value_heads", where, default=heads, hi=heads),
            head_dim=integer(cfg, "head_dim", where, default=hidden // heads),
            rms_norm_eps=number(cfg, "rms_norm_eps", where),
            rope=overrides.pop("rope", None) or RopeConfig.from_hf(cfg, where),
            max_position_embeddings=integer(cfg, "max_position_embeddings", where),
            tie_word_embeddings=flag(cfg, "tie_word_embeddings", where, False),
            attention_bias=flag(cfg, "attention_bias", where, False),
            mlp_bias=flag(cfg, "mlp_bias", where, False),
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


def _proj(b: GraphBuilder, w: Weights, names: dict, x: ir.Value, key: str, i: int, shape: tuple[int, int], bias: bool) -> ir.Value:
    base = names[key].format(i=i)
    with b.scope(key.split("/")[-1]):
        weight = w.get(base + ".weight", shape, transpose=True)
        b_val = w.get(base + ".bias", (shape[0],)) if bias else None
        return L.linear(b, x, weight, b_val)


def _norm(b: GraphBuilder, w: Weights, c: DecoderConfig, names: dict, key: str, i: int, x: ir.Value) -> ir.Value:
    with b.scope(key):
        weight = w.get(names[key].format(i=i), (c.hidden_size,), offset=c.norm_offset)
        return L.rms_norm(b, x, weight, c.rms_norm_eps)


def _split(b: GraphBuilder, y: ir.Value, sizes: list[int], leaf: str) -> list[ir.Value]:
    """A fused checkpoint projection [B, S, sum(sizes)] into its parts (what merge_qkv would emit)."""
    return b.op("Split", [y, b.const(np.array(sizes), "split_sizes")], leaf, axis=-1, num_outputs=len(sizes))


def _qkv(b: GraphBuilder, w: Weights, c: DecoderConfig, names: dict, i: int, h: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    H, D, nq, nkv = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
    if c.fused_qkv:
        qkv = _proj(b, w, names, h, "attn/qkv_proj", i, ((nq + 2 * nkv) * D, H), c.attention_bias)
        return tuple(_split(b, qkv, [nq * D, nkv * D, nkv * D], "qkv_split"))
    return tuple(_proj(b, w, names, h, f"attn/{p}_proj", i, (n * D, H), c.attention_bias) for p, n in (("q", nq), ("k", nkv), ("v", nkv)))


def _attention(b: GraphBuilder, w: Weights, c: DecoderConfig, names: dict, i: int, h: ir.Value, inp: L.DecoderInputs,
               past: tuple[ir.Value, ir.Value]) -> tuple[ir.Value, ir.Value, ir.Value]:
    """h [B, S, H] -> attention output [B, S, H] and the present caches."""
    H, D, nq, nkv = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads
    sliding = c.sliding_window is not None and (c.sliding_layers is None or c.sliding_layers[i])
    q, k, v = _qkv(b, w, c, names, i, h)
    if c.qk_norm:
        q = L.head_norm(b, q, w.get(names["attn/q_norm"].format(i=i), (D,), offset=c.norm_offset), nq, D, c.rms_norm_eps, "q_norm")
        k = L.head_norm(b, k, w.get(names["attn/k_norm"].format(i=i), (D,), offset=c.norm_offset), nkv, D, c.rms_norm_eps, "k_norm")
    q = L.rotary(b, q, inp, nq, D, "q_rotary", local=sliding)
    k = L.rotary(b, k, inp, nkv, D, "k_rotary", local=sliding)
    y, pk, pv = L.cached_attention(b, q, k, v, past[0], past[1], inp, (nq, nkv, D), sliding=sliding, scale=c.query_scale)
    return _proj(b, w, names, y, "attn/o_proj", i, (H, nq * D), False), pk, pv


def _mlp(b: GraphBuilder, w: Weights, c: DecoderConfig, names: dict, i: int, h: ir.Value) -> ir.Value:
    H, I = c.hidden_size, c.intermediate_size
    if c.moe is not None and i not in c.moe.dense_layers:
        return moe_mlp(b, w, c.moe, i, h, H, c.hidden_act)
    if c.fused_gate_up:
        gate, up = _split(b, _proj(b, w, names, h, "mlp/gate_up_proj", i, (2 * I, H), c.mlp_bias), [I, I], "gate_up_split")
    else:
        gate = _proj(b, w, names, h, "mlp/gate_proj", i, (I, H), c.mlp_bias)
        up = _proj(b, w, names, h, "mlp/up_proj", i, (I, H), c.mlp_bias)
    return _proj(b, w, names, L.gated_mlp(b, gate, up, c.hidden_act), "mlp/down_proj", i, (H, I), c.mlp_bias)


def _layer(b: GraphBuilder, w: Weights, c: DecoderConfig, names: dict, i: int, x: ir.Value, inp: L.DecoderInputs,
           past: tuple[ir.Value, ir.Value]) -> tuple[ir.Value, ir.Value, ir.Value]:
    """One decoder layer: x [B, S, H] -> x [B, S, H], present k/v. Sandwich norms (Gemma 3) also
    normalise each block's output before the residual add."""
    h = _norm(b, w, c, names, "attn_norm", i, x)
    with b.scope("attn"):
        y, pk, pv = _attention(b, w, c, names, i, h, inp, past)
    if c.sandwich_norms:
        y = _norm(b, w, c, names, "attn_post_norm", i, y)
    x = b.op("Add", [x, y], "attn_residual")
    h = _norm(b, w, c, names, "mlp_norm", i, x)
    with b.scope("mlp"):
        y = _mlp(b, w, c, names, i, h)
    if c.sandwich_norms:
        y = _norm(b, w, c, names, "mlp_post_norm", i, y)
    return b.op("Add", [x, y], "mlp_residual"), pk, pv


def build(c: DecoderConfig, ckpt: Checkpoint, max_seq: int, names: dict | None = None) -> ir.Model:
    """The decoder graph: input_ids, position_ids, logits_positions, past caches -> logits, present caches.
    names: the architecture's checkpoint-name map (default: Llama's WEIGHTS)."""
    names = names or WEIGHTS
    b = GraphBuilder("kiln_decoder")
    w = Weights(ckpt, b)
    input_ids = b.input("input_ids", ir.DataType.INT64, ["batch", "seq"])
    rotary_dim = c.rope.rotary_dim(c.head_dim)
    local = c.local_rope.tables(rotary_dim, max_seq) if c.local_rope is not None else None
    inp = L.decoder_inputs(b, max_seq, c.rope.tables(rotary_dim, max_seq), c.sliding_window, local)
    cache_shape = ["batch", c.num_kv_heads, max_seq, c.head_dim]
    pasts = [(b.input(f"past_key.{i}", ir.DataType.FLOAT, cache_shape), b.input(f"past_value.{i}", ir.DataType.FLOAT, cache_shape))
             for i in range(c.num_layers)]
    with b.scope("embed"):
        x, table = _embed(b, w, c, names, input_ids)
    presents = []
    for i in range(c.num_layers):
        with b.layer(i):
            x, pk, pv = _layer(b, w, c, names, i, x, inp, pasts[i])
        presents.append((pk, pv))
    x = L.select_positions(b, x)  # [B, K, H]: only the positions whose logits are wanted
    x = _norm(b, w, c, names, "norm", 0, x)
    with b.scope("lm_head"):
        logits = L.linear(b, x, table)  # [B, K, V]
    b.output(logits, "logits")
    for i, (pk, pv) in enumerate(presents):
        b.output(pk, f"present_key.{i}")
        b.output(pv, f"present_value.{i}")
    return b.model()


def _embed(b: GraphBuilder, w: Weights, c: DecoderConfig, names: dict, input_ids: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Token embeddings [B, S, H] and the lm_head table [H, V] for MatMul (faster than Gemm transB on CPU).

    Tied embeddings keep one [H, V] copy: the lookup gathers its columns and transposes."""
    tied = c.tie_word_embeddings or not w.has(names["lm_head"])
    if tied and not c.tie_word_embeddings:
        raise KilnError(f"checkpoint {w.ckpt.root} lacks weight {names['lm_head']}",
                        "use the complete checkpoint, or set tie_word_embeddings in config.json")
    if tied:
        table = w.get(names["embed"], (c.vocab_size, c.hidden_size), transpose=True)  # [H, V]
        cols = b.op("Gather", [table, input_ids], "Gather", axis=1)  # [H, B, S]
        x = b.op("Transpose", [cols], "Transpose", perm=[1, 2, 0])
    else:
        embed = w.get(names["embed"], (c.vocab_size, c.hidden_size))
        table = w.get(names["lm_head"], (c.vocab_size, c.hidden_size), transpose=True)
        x = b.op("Gather", [embed, input_ids], "Gather", axis=0)
    if c.embed_scale is not None:  # in the activations' dtype, as transformers does
        x = b.op("Mul", [x, b.const(np.array(c.embed_scale, dtype=np.float32), "scale")], "scale")
    return x, table
