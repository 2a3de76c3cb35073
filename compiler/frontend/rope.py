"""Rotary position embedding: the config as read from `config.json`, and its cos/sin tables.

Both config styles are read explicitly: transformers 5 writes `rope_parameters`
({rope_type, rope_theta, ...}); older checkpoints write `rope_theta` and `rope_scaling`.
A scaling type kiln does not implement is refused with its name, never ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compiler.errors import KilnError
from compiler.frontend.config_fields import integer, number

SUPPORTED = ("default", "linear", "llama3", "dynamic", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0  # rotate only this fraction of each head's dims
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to the original length
    attention_factor: float = 1.0  # longrope: cos/sin are multiplied by it
    max_position_embeddings: int = 0  # dynamic: the length up to which it equals default rope

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json", params: dict | None = None) -> "RopeConfig":
        """params: one layer type's rope_parameters (Gemma 3 has one per layer type)."""
        params = params if params is not None else cfg.get("rope_parameters")
        if params is None:  # transformers 4 style
            if "rope_theta" not in cfg:
                raise KilnError(f"{where} has neither rope_parameters nor rope_theta", "add the model's rope_theta to config.json")
            params = cfg.get("rope_scaling") or {}
            params = {**params, "rope_theta": cfg["rope_theta"]} if isinstance(params, dict) else params
        if not isinstance(params, dict):
            raise KilnError(f"{where}: rope parameters must be a JSON object, got {params!r}", "fix rope_parameters in config.json")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED:
            raise KilnError(
                f"{where}: rope scaling type {rope_type!r} is not supported",
                f"kiln implements {', '.join(SUPPORTED)}",
            )
        if "rope_theta" not in params:
            raise KilnError(f"{where}: rope_parameters lacks rope_theta", "add rope_theta to rope_parameters")
        kw = {"theta": number(params, "rope_theta", where), "rope_type": rope_type}
        if rope_type in ("linear", "llama3"):
            kw["factor"] = number(params, "factor", where)
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                kw[key] = number(params, key, where)
            kw["original_max_position_embeddings"] = integer(params, "original_max_position_embeddings", where)
        partial = params if params.get("partial_rotary_factor") is not None else cfg
        kw["partial_rotary_factor"] = number(partial, "partial_rotary_factor", where, default=1.0)
        if rope_type == "dynamic":
            kw["max_position_embeddings"] = integer(cfg, "max_position_embeddings", where)
        if rope_type == "longrope":
            kw.update(_longrope(cfg, params, where))
        return cls(**kw)

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)

    def inv_freq(self, rotary_dim: int) -> np.ndarray:
        """[rotary_dim/2] float32 inverse frequencies after scaling (float32, as transformers)."""
        exponent = np.arange(0, rotary_dim, 2).astype(np.float32) / np.float32(rotary_dim)
        inv = (np.float32(1.0) / np.power(np.float32(self.theta), exponent)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            return _llama3_scale(inv, self).astype(np.float32)
        if self.rope_type == "longrope":
            ext = np.asarray(self.short_factor, dtype=np.float32)
            return (np.float32(1.0) / (ext * np.power(np.float32(self.theta), exponent))).astype(np.float32)
        return inv

    def tables(self, rotary_dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin caches [max_positions, rotary_dim/2] float32, as RotaryEmbedding-23 takes them.

        dynamic and longrope change their frequencies once a sequence passes a length; a static
        table can hold only the frequencies below it, so max_seq must stay below it."""
        limit = {"dynamic": self.max_position_embeddings, "longrope": self.original_max_position_embeddings}.get(self.rope_type)
        if limit and max_positions > limit:
            raise KilnError(f"rope scaling {self.rope_type!r} switches frequencies past {limit} positions, which a static "
                            f"table of max_seq {max_positions} cannot follow", f"set max_seq <= {limit} in the recipe")
        inv = self.inv_freq(rotary_dim)
        # transformers computes position * inv_freq in float32: match it bit for bit
        angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv[None, :]
        cos, sin = np.cos(angles), np.sin(angles)
        if self.attention_factor != 1.0:
            cos, sin = cos * np.float32(self.attention_factor), sin * np.float32(self.attention_factor)
        return cos.astype(np.float32), sin.astype(np.float32)


def _need(params: dict, key: str, where: str):
    if key not in params:
        raise KilnError(f"{where}: rope scaling {params.get('rope_type')!r} lacks {key}", f"add {key} to rope_parameters")
    return params[key]


def _longrope(cfg: dict, params: dict, where: str) -> dict:
    """Phi-3's longrope: short factors below the original length, and the cos/sin scale."""
    key = "original_max_position_embeddings"
    original = integer(params if params.get(key) else cfg, key, where)
    factor = number(params, "factor", where) if params.get("factor") else integer(cfg, "max_position_embeddings", where) / original
    attention = number(params, "attention_factor", where) if params.get("attention_factor") is not None else None
    if attention is None:
        attention = 1.0 if factor <= 1.0 or original < 2 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = _need(params, "short_factor", where)
    if not isinstance(short, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in short):
        raise KilnError(f"{where}: rope short_factor must be a list of positive numbers", "fix short_factor in config.json")
    return {"short_factor": tuple(float(x) for x in short),
            "original_max_position_embeddings": original, "attention_factor": float(attention), "factor": float(factor)}


def _llama3_scale(inv: np.ndarray, rc: RopeConfig) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling: low frequencies / factor, high kept, smooth between."""
    low_wavelen = rc.original_max_position_embeddings / rc.low_freq_factor
    high_wavelen = rc.original_max_position_embeddings / rc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rc.factor, inv)
    smooth = (rc.original_max_position_embeddings / wavelen - rc.low_freq_factor) / (rc.high_freq_factor - rc.low_freq_factor)
    mid = (1 - smooth) * scaled / rc.factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_mid, mid, scaled)
