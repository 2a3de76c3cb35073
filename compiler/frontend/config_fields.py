"""Typed, range-checked reads of `config.json` values.

A config that lies (`num_hidden_layers: -1`, `rms_norm_eps: "tiny"`, `tie_word_embeddings:
"false"`) must fail the build with one line naming the key, not build a wrong engine or raise a
traceback. Every number a model file reads goes through `integer` or `number`, whose bounds are
data here (`INT_RANGES` / `FLOAT_RANGES`, by key name), and every switch through `flag`.
"""

from __future__ import annotations

import math

from compiler.errors import KilnError

_MISSING = object()

# key -> inclusive [lo, hi]: generous beyond every released model, tight enough to catch nonsense
INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "moe_intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 4096),
    "max_position_embeddings": (1, 1 << 24),
    "original_max_position_embeddings": (1, 1 << 24),
    "sliding_window": (1, 1 << 24),
    "num_local_experts": (1, 4096),
    "num_experts": (1, 4096),
    "num_experts_per_tok": (1, 4096),
    "decoder_sparse_step": (0, 1024),
    "type_vocab_size": (1, 1 << 16),
}
# key -> open interval (lo, hi): eps must be positive and small, scales positive and finite
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "rms_norm_eps": (0.0, 1.0),
    "layer_norm_eps": (0.0, 1.0),
    "rope_theta": (0.0, 1e12),
    "factor": (0.0, 1e6),
    "low_freq_factor": (0.0, 1e6),
    "high_freq_factor": (0.0, 1e6),
    "attention_factor": (0.0, 1e6),
    "query_pre_attn_scalar": (0.0, 1e9),
}
UNIT_FLOATS = ("partial_rotary_factor",)  # (0, 1]


def need(cfg: dict, key: str, where: str):
    """A value kiln relies on; absent or null is refused, naming the key."""
    if key not in cfg or cfg[key] is None:
        raise KilnError(f"{where} lacks {key}", f"add {key} to config.json")
    return cfg[key]


def _get(cfg: dict, key: str, where: str, default):
    """The value, or the default when absent/null (a default is range-checked like a value)."""
    if default is not _MISSING and cfg.get(key) is None:
        return default
    return need(cfg, key, where)


def _bad(where: str, key: str, value, why: str) -> KilnError:
    return KilnError(f"{where}: {key}={value!r} {why}", f"fix {key} in config.json (it must describe these weights)")


def integer(cfg: dict, key: str, where: str, default=_MISSING, lo: int | None = None, hi: int | None = None) -> int:
    """An integer in INT_RANGES[key] (or [lo, hi] when given); 64.0 is accepted as 64."""
    value = _get(cfg, key, where, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise _bad(where, key, value, "is not an integer")
    lo_r, hi_r = INT_RANGES.get(key, (0, 1 << 62))
    lo, hi = lo_r if lo is None else lo, hi_r if hi is None else hi
    if not lo <= value <= hi:
        raise _bad(where, key, value, f"is outside {lo}..{hi}")
    return int(value)


def number(cfg: dict, key: str, where: str, default=_MISSING) -> float:
    """A finite float inside FLOAT_RANGES[key] (open interval), or (0, 1] for UNIT_FLOATS."""
    value = _get(cfg, key, where, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(where, key, value, "is not a finite number")
    if key in UNIT_FLOATS:
        if not 0.0 < value <= 1.0:
            raise _bad(where, key, value, "is outside (0, 1]")
    elif key in FLOAT_RANGES:
        lo, hi = FLOAT_RANGES[key]
        if not lo < value < hi:
            raise _bad(where, key, value, f"is outside ({lo:g}, {hi:g})")
    return float(value)


def refuse_sliding_window(cfg: dict, where: str) -> None:
    """Qwen-family configs declare `use_sliding_window`; kiln does not implement its per-layer rule
    (`max_window_layers`), so a config that turns it on is refused rather than built with full attention."""
    if cfg.get("use_sliding_window"):
        raise KilnError(f"{where}: use_sliding_window=true is not supported", "set use_sliding_window to false")


def flag(cfg: dict, key: str, where: str, default: bool) -> bool:
    """A JSON boolean (null or absent: default); "false" as a string is refused, not truthy."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(where, key, value, "is not true or false")
    return value
