"""Gemma 3 text model (`Gemma3ForCausalLM`): the shared decoder with
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
from compiler.frontend.models import decoder
from compiler.frontend.models.architecture import Architecture
from compiler.frontend.config_fields import flag, integer, need, number
from compiler.frontend.rope import RopeConfig

ARCH = "Gemma3ForCausalLM"
WHERE = f"config.json of {ARCH}"

WEIGHTS = {
    **decoder.WEIGHTS,
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
    act = need(cfg, "hidden_activation", WHERE)
    if not isinstance(act, str) or act not in _ACTIVATIONS:
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
    base = number(cfg, "rope_local_base_freq", where)  # transformers 4 style
    return RopeConfig.from_hf(cfg, where), RopeConfig(theta=base)


def config(cfg: dict) -> decoder.DecoderConfig:
    _refuse_unsupported(cfg)
    layers = integer(cfg, "num_hidden_layers", WHERE)
    types = need(cfg, "layer_types", WHERE)
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        types = [repr(types)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if len(types) != layers or unknown:
        raise KilnError(f"config.json of {ARCH}: layer_types {types} does not give one known type per layer",
                        "use sliding_attention / full_attention, one per layer")
    rope, local = _ropes(cfg)
    hidden = integer(cfg, "hidden_size", WHERE)
    return decoder.DecoderConfig.from_hf(
        cfg, ARCH,
        rope=rope, local_rope=local,
        sliding_window=integer(cfg, "sliding_window", WHERE),
        sliding_layers=tuple(t == "sliding_attention" for t in types),
        qk_norm=True, norm_offset=1.0, sandwich_norms=True,
        hidden_act=_ACTIVATIONS[cfg["hidden_activation"]],
        embed_scale=math.sqrt(hidden),
        query_scale=number(cfg, "query_pre_attn_scalar", WHERE) ** -0.5,
        tie_word_embeddings=flag(cfg, "tie_word_embeddings", WHERE, True),
    )


def build(c: decoder.DecoderConfig, ckpt, max_seq: int):
    return decoder.build(c, ckpt, max_seq, WEIGHTS)


ARCHITECTURE = Architecture(ARCH, config, build, ignored_weights=decoder.IGNORED_WEIGHTS, shards=decoder.SHARDS)
