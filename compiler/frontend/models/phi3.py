"""Phi-3 / Phi-4-mini (`Phi3ForCausalLM`): the Llama decoder over a checkpoint that already fuses
qkv (`qkv_proj`, q then k then v) and gate/up (`gate_up_proj`, gate first); partial rotary and
`longrope` scaling come from the rope config. Sliding windows are refused (no released Phi-3
uses one with full-length attention semantics kiln could check)."""

from __future__ import annotations

from compiler.errors import KilnError
from compiler.frontend.models import llama

SHARDS = llama.SHARDS
IGNORED_WEIGHTS = llama.IGNORED_WEIGHTS
ARCH = "Phi3ForCausalLM"

WEIGHTS = {
    **llama.WEIGHTS,
    "attn/qkv_proj": "model.layers.{i}.self_attn.qkv_proj",
    "mlp/gate_up_proj": "model.layers.{i}.mlp.gate_up_proj",
}


def config(cfg: dict) -> llama.LlamaConfig:
    if cfg.get("sliding_window"):
        raise KilnError(f"config.json of {ARCH}: sliding_window={cfg['sliding_window']} is not supported",
                        "set sliding_window to null (full attention)")
    return llama.LlamaConfig.from_hf(cfg, ARCH, fused_qkv=True, fused_gate_up=True)


def build(c: llama.LlamaConfig, ckpt, max_seq: int):
    return llama.build(c, ckpt, max_seq, WEIGHTS)
