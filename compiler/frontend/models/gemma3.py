"""Gemma 3 text model (`Gemma3ForCausalLM`): the Llama decoder with
- sliding-window layers interleaved with global ones (`layer_types`), each kind with its own
  rope (`rope_parameters` per layer type, or `rope_local_base_freq` in older configs);
- RMSNorm weights stored as w - 1 (the graph uses 1 + w), q/k norms per head, and norms both
  before and after the attention and MLP blocks;
- embeddings scaled by sqrt(hidden), a GELU-tanh gated MLP, attention scaled by
  query_pre_attn_scalar ** -0.5, tied embeddings.
Logit soft-capping (Gemma 2) and bidirectional attention are refused, naming the key."""

from __future__ import annotations

import math

from compiler.errors import KilnError
from compiler.frontend.models import llama
from compiler.frontend.models.llama import need
from compiler.frontend.rope import RopeConfig

SHARDS = llama.SHARDS
ARCH = "Gemma3ForCausalLM"

WEIGHTS = {
    **llama.WEIGHTS,
    "attn_post_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "mlp_post_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
}

_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh"}


def _refuse_unsupported(cfg: dict) -> None:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise KilnError(f"config.json of {ARCH}: {key}={cfg[key]} is not supported", f"set {key} to null")
    if cfg.get("use_bidirectional_attention"):
        raise KilnError(f"config.json of {ARCH}: use_bidirectional_attention=true is not supported",
                        "kiln builds causal decoders")
    act = need(cfg, "hidden_activation", ARCH)
    if act not in _ACTIVATIONS:
        raise KilnError(f"config.json of {ARCH}: hidden_activation {act!r} is not supported", "use gelu_pytorch_tanh")


def _ropes(cfg: dict) -> tuple[RopeConfig, RopeConfig]:
    """(global, local) rope: transformers 5 writes rope_parameters per layer type."""
    where = f"config.json of {ARCH}"
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        local = params.get("sliding_attention")
        if local is None:
            raise KilnError(f"{where}: rope_parameters lacks sliding_attention", "add the sliding layers' rope_parameters")
        return RopeConfig.from_hf(cfg, where, params["full_attention"]), RopeConfig.from_hf(cfg, where, local)
    base = need(cfg, "rope_local_base_freq", ARCH)  # transformers 4 style
    return RopeConfig.from_hf(cfg, where), RopeConfig(theta=float(base))


def config(cfg: dict) -> llama.LlamaConfig:
    _refuse_unsupported(cfg)
    layers = int(need(cfg, "num_hidden_layers", ARCH))
    types = need(cfg, "layer_types", ARCH)
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if len(types) != layers or unknown:
        raise KilnError(f"config.json of {ARCH}: layer_types {types} does not give one known type per layer",
                        "use sliding_attention / full_attention, one per layer")
    rope, local = _ropes(cfg)
    hidden = int(need(cfg, "hidden_size", ARCH))
    return llama.LlamaConfig.from_hf(
        cfg, ARCH,
        rope=rope, local_rope=local,
        sliding_window=int(need(cfg, "sliding_window", ARCH)),
        sliding_layers=tuple(t == "sliding_attention" for t in types),
        qk_norm=True, norm_offset=1.0, sandwich_norms=True,
        hidden_act=_ACTIVATIONS[cfg["hidden_activation"]],
        embed_scale=math.sqrt(hidden),
        query_scale=float(need(cfg, "query_pre_attn_scalar", ARCH)) ** -0.5,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


def build(c: llama.LlamaConfig, ckpt, max_seq: int):
    return llama.build(c, ckpt, max_seq, WEIGHTS)
