"""Phi-3 / Phi-4-mini (`Phi3ForCausalLM`): the shared decoder over a checkpoint that already fuses
qkv (`qkv_proj`, q then k then v) and gate/up (`gate_up_proj`, gate first); partial rotary and
`longrope` scaling come from the rope config. Sliding windows are refused (no released Phi-3
uses one with full-length attention semantics kiln could check)."""

from __future__ import annotations

from compiler.errors import KilnError
from compiler.frontend.models import decoder
from compiler.frontend.models.architecture import Architecture

ARCH = "Phi3ForCausalLM"

WEIGHTS = {
    **decoder.WEIGHTS,
    "attn/qkv_proj": "model.layers.{i}.self_attn.qkv_proj",
    "mlp/gate_up_proj": "model.layers.{i}.mlp.gate_up_proj",
}


def config(cfg: dict) -> decoder.DecoderConfig:
    if cfg.get("sliding_window"):
        raise KilnError(f"config.json of {ARCH}: sliding_window={cfg['sliding_window']} is not supported",
                        "set sliding_window to null (full attention)")
    return decoder.DecoderConfig.from_hf(cfg, ARCH, fused_qkv=True, fused_gate_up=True)


def build(c: decoder.DecoderConfig, ckpt, max_seq: int):
    return decoder.build(c, ckpt, max_seq, WEIGHTS)


ARCHITECTURE = Architecture(ARCH, config, build, ignored_weights=decoder.IGNORED_WEIGHTS, shards=decoder.SHARDS)
