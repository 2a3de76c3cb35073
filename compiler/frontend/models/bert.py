"""BERT encoders (`BertModel`, `BertForMaskedLM`) as sentence-embedding engines.

Graph: input_ids, attention_mask, token_type_ids [B, S] -> last_hidden_state [B, S, H] and
sentence_embedding [B, H] (mean of the unmasked tokens, as sentence-transformers' mean pooling).
Post-LN encoder layers with bidirectional attention masked to each row's tokens, GELU (erf) MLP.
The masked-LM head of BertForMaskedLM is not part of an embedding engine and is not read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from compiler.frontend.checkpoint import Checkpoint
from compiler.frontend.config_fields import integer, number
from compiler.frontend.models.architecture import Architecture
from compiler.frontend.weights import Weights
from compiler.ir.builder import GraphBuilder

ARCH = "BertModel"
# not part of an embedding engine: the pooler, the masked-LM head, position-id buffers
IGNORED_WEIGHTS = ("pooler.*", "bert.pooler.*", "cls.*", "*position_ids")

# Checkpoint names under the model prefix ("" for BertModel, "bert." for BertForMaskedLM)
WEIGHTS = {
    "word": "embeddings.word_embeddings.weight",
    "position": "embeddings.position_embeddings.weight",
    "token_type": "embeddings.token_type_embeddings.weight",
    "embed_norm": "embeddings.LayerNorm",
    "attn/q_proj": "encoder.layer.{i}.attention.self.query",
    "attn/k_proj": "encoder.layer.{i}.attention.self.key",
    "attn/v_proj": "encoder.layer.{i}.attention.self.value",
    "attn/o_proj": "encoder.layer.{i}.attention.output.dense",
    "attn_norm": "encoder.layer.{i}.attention.output.LayerNorm",
    "mlp/up_proj": "encoder.layer.{i}.intermediate.dense",
    "mlp/down_proj": "encoder.layer.{i}.output.dense",
    "mlp_norm": "encoder.layer.{i}.output.LayerNorm",
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def config(cfg: dict) -> BertConfig:
    arch = ARCH
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise KilnError(f"config.json of {arch}: hidden_act {act!r} is not supported", "kiln builds BERT with gelu (erf)")
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise KilnError(f"config.json of {arch}: position_embedding_type {pos!r} is not supported", "use absolute positions")
    where = f"config.json of {arch}"
    c = BertConfig(
        **{f: integer(cfg, key, where) for f, key in (
            ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
            ("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads"),
            ("max_position_embeddings", "max_position_embeddings"), ("type_vocab_size", "type_vocab_size"))},
        layer_norm_eps=number(cfg, "layer_norm_eps", where),
    )
    if c.hidden_size % c.num_heads:
        raise KilnError(f"config.json of {arch}: hidden_size {c.hidden_size} is not a multiple of {c.num_heads} heads",
                        "fix num_attention_heads")
    return c


class _Reader:
    """Weights under the checkpoint's prefix."""

    def __init__(self, w: Weights):
        self.w = w
        self.prefix = "bert." if w.has("bert." + WEIGHTS["word"]) else ""

    def get(self, key: str, shape: tuple, i: int = 0, suffix: str = "", transpose: bool = False) -> ir.Value:
        return self.w.get(self.prefix + WEIGHTS[key].format(i=i) + suffix, shape, transpose=transpose)


def _layer_norm(b: GraphBuilder, r: _Reader, c: BertConfig, key: str, x: ir.Value, i: int = 0) -> ir.Value:
    H = c.hidden_size
    with b.scope(key):
        return b.op("LayerNormalization", [x, r.get(key, (H,), i, ".weight"), r.get(key, (H,), i, ".bias")],
                    "LayerNormalization", axis=-1, epsilon=c.layer_norm_eps)


def _dense(b: GraphBuilder, r: _Reader, key: str, x: ir.Value, shape: tuple[int, int], i: int) -> ir.Value:
    with b.scope(key.split("/")[-1]):
        y = b.op("MatMul", [x, r.get(key, shape, i, ".weight", transpose=True)])
        return b.op("Add", [y, r.get(key, (shape[0],), i, ".bias")])


def _heads(b: GraphBuilder, x: ir.Value, c: BertConfig, leaf: str) -> ir.Value:
    x4 = b.op("Reshape", [x, b.const(np.array([0, 0, c.num_heads, c.head_dim]), "heads_shape")], f"{leaf}_reshape")
    return b.op("Transpose", [x4], f"{leaf}_transpose", perm=[0, 2, 1, 3])  # [B, N, S, D]


def _layer(b: GraphBuilder, r: _Reader, c: BertConfig, i: int, x: ir.Value, mask: ir.Value) -> ir.Value:
    H, I = c.hidden_size, c.intermediate_size
    with b.scope("attn"):
        q, k, v = (_heads(b, _dense(b, r, f"attn/{p}_proj", x, (H, H), i), c, p) for p in "qkv")
        y = b.op("Attention", [q, k, v, mask], "Attention", scale=1.0 / math.sqrt(c.head_dim))  # [B, N, S, D]
        y = b.op("Transpose", [y], "merge_transpose", perm=[0, 2, 1, 3])
        y = b.op("Reshape", [y, b.const(np.array([0, 0, H]), "merge_shape")], "merge_reshape")
        y = _dense(b, r, "attn/o_proj", y, (H, H), i)
    x = _layer_norm(b, r, c, "attn_norm", b.op("Add", [x, y], "attn_residual"), i)
    with b.scope("mlp"):
        h = b.op("Gelu", [_dense(b, r, "mlp/up_proj", x, (I, H), i)], "act")
        y = _dense(b, r, "mlp/down_proj", h, (H, I), i)
    return _layer_norm(b, r, c, "mlp_norm", b.op("Add", [x, y], "mlp_residual"), i)


def _embeddings(b: GraphBuilder, r: _Reader, c: BertConfig, ids: ir.Value, types: ir.Value) -> ir.Value:
    H = c.hidden_size
    with b.scope("embed"):
        words = b.op("Gather", [r.get("word", (c.vocab_size, H)), ids], "word_Gather", axis=0)  # [B, S, H]
        seq = b.op("Slice", [b.op("Shape", [ids], "ids_shape"), b.const(np.array([1]), "one"), b.const(np.array([2]), "two")],
                   "seq_len")
        pos = b.op("Slice", [r.get("position", (c.max_position_embeddings, H)), b.const(np.array([0]), "zero"), seq],
                   "positions")  # [S, H]
        kinds = b.op("Gather", [r.get("token_type", (c.type_vocab_size, H)), types], "type_Gather", axis=0)
        x = b.op("Add", [b.op("Add", [words, pos], "add_positions"), kinds], "add_types")
    return _layer_norm(b, r, c, "embed_norm", x)


def _mean_pool(b: GraphBuilder, x: ir.Value, mask: ir.Value) -> ir.Value:
    """Mean of x [B, S, H] over the tokens where mask [B, S] is 1 -> [B, H]."""
    with b.scope("pool"):
        m = b.op("Unsqueeze", [b.op("Cast", [mask], "mask_float", to=ir.DataType.FLOAT), b.const(np.array([-1]), "last")],
                 "mask_3d")  # [B, S, 1]
        total = b.op("ReduceSum", [b.op("Mul", [x, m], "masked"), b.const(np.array([1]), "seq_axis")], "sum", keepdims=0)
        count = b.op("ReduceSum", [m, b.const(np.array([1]), "seq_axis_1")], "count", keepdims=0)  # [B, 1]
        count = b.op("Max", [count, b.const(np.array(1e-9, dtype=np.float32), "floor")], "clamp")
        return b.op("Div", [total, count], "mean")


def build(c: BertConfig, ckpt: Checkpoint, max_seq: int) -> ir.Model:
    if max_seq > c.max_position_embeddings:
        raise KilnError(f"max_seq {max_seq} exceeds BERT's {c.max_position_embeddings} positions", "lower max_seq in the recipe")
    b = GraphBuilder("kiln_encoder")
    r = _Reader(Weights(ckpt, b))
    ids = b.input("input_ids", ir.DataType.INT64, ["batch", "seq"])
    attn = b.input("attention_mask", ir.DataType.INT64, ["batch", "seq"])
    types = b.input("token_type_ids", ir.DataType.INT64, ["batch", "seq"])
    with b.scope("inputs"):  # [B, 1, S, S] bool: queries attend to their row's real tokens; padding
        real = b.op("Cast", [attn], "mask_bool", to=ir.DataType.BOOL)  # queries see everything (never all-masked:
        keys = b.op("Unsqueeze", [real, b.const(np.array([1, 2]), "key_axes")], "keys")  # no NaN), pooling drops them
        pads = b.op("Not", [b.op("Unsqueeze", [real, b.const(np.array([1, 3]), "query_axes")], "queries")], "pad_queries")
        key_mask = b.op("Or", [keys, pads], "key_mask")
    x = _embeddings(b, r, c, ids, types)
    for i in range(c.num_layers):
        with b.layer(i):
            x = _layer(b, r, c, i, x, key_mask)
    b.output(x, "last_hidden_state")
    b.output(_mean_pool(b, x, attn), "sentence_embedding")
    return b.model()


ARCHITECTURE = Architecture(ARCH, config, build, task="embed", ignored_weights=IGNORED_WEIGHTS, aliases=("BertForMaskedLM",))
