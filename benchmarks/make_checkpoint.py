"""Random-weight Llama-shaped checkpoints for build benchmarks, made offline.

Sizes share one width (hidden 1536, intermediate 4096, 12 heads / 4 KV heads of 128, SmolLM2's
49152-token vocabulary and tokenizer, untied lm_head) and differ in depth, so a build's memory
against size shows what grows with the number of layers:
  0.5B  14 layers (504M parameters)      2B  73 layers (1991M parameters)
Weights are bf16 safetensors in shards of at most --shard-gib, with a model.safetensors.index.json,
written tensor by tensor (one tensor in memory at a time; each drawn from its own seeded stream).
Usage: make_checkpoint.py {0.5B,2B} OUT_DIR [--tokenizer-from DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WIDTH = {"hidden_size": 1536, "intermediate_size": 4096, "num_attention_heads": 12, "num_key_value_heads": 4,
         "head_dim": 128, "vocab_size": 49152}
LAYERS = {"0.5B": 14, "2B": 73}
ROWS_AT_ONCE = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **WIDTH, "num_hidden_layers": layers,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, [out, in] shape) in checkpoint order."""
    H, I, V = WIDTH["hidden_size"], WIDTH["intermediate_size"], WIDTH["vocab_size"]
    q, kv = WIDTH["num_attention_heads"] * WIDTH["head_dim"], WIDTH["num_key_value_heads"] * WIDTH["head_dim"]
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (H,)), (f"{p}.self_attn.q_proj.weight", (q, H)),
                (f"{p}.self_attn.k_proj.weight", (kv, H)), (f"{p}.self_attn.v_proj.weight", (kv, H)),
                (f"{p}.self_attn.o_proj.weight", (H, q)), (f"{p}.post_attention_layernorm.weight", (H,)),
                (f"{p}.mlp.gate_proj.weight", (I, H)), (f"{p}.mlp.up_proj.weight", (I, H)),
                (f"{p}.mlp.down_proj.weight", (H, I))]
    return out + [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]


def _bf16(name: str, shape: tuple[int, ...], seed: int) -> bytes:
    """Norm weights 1, linears N(0, 0.02): bf16 bytes (the top half of each float32, rounded)."""
    if len(shape) == 1:
        x = np.ones(shape, np.float32)
    else:
        x = np.random.default_rng([seed, len(name), sum(map(ord, name))]).standard_normal(shape, dtype=np.float32) * 0.02
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def write(out: Path, size: str, shard_gib: float, tokenizer_from: Path, seed: int = 0) -> int:
    """Writes the checkpoint; returns its parameter count."""
    out.mkdir(parents=True, exist_ok=True)
    specs = tensors(LAYERS[size])
    limit = int(shard_gib * 2**30)
    shards, cur, used = [], [], 0
    for name, shape in specs:  # bf16: 2 bytes an element
        nbytes = 2 * int(np.prod(shape))
        if cur and used + nbytes > limit:
            shards.append(cur)
            cur, used = [], 0
        cur.append((name, shape))
        used += nbytes
    shards.append(cur)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shard:
            n = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:  # large tensors a few thousand rows at a time
                rows = shape[0] if len(shape) > 1 else 1
                for r in range(0, rows, ROWS_AT_ONCE):
                    part = (min(ROWS_AT_ONCE, rows - r), *shape[1:]) if len(shape) > 1 else shape
                    f.write(_bf16(f"{name}:{r}", part, seed))
    params = sum(int(np.prod(s)) for _, s in specs)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 2 * params}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config(LAYERS[size]), indent=1))
    for f in TOKENIZER_FILES:
        if (tokenizer_from / f).is_file():
            shutil.copy2(tokenizer_from / f, out / f)
    return params


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("size", choices=sorted(LAYERS))
    p.add_argument("out", type=Path)
    p.add_argument("--shard-gib", type=float, default=0.5)
    p.add_argument("--tokenizer-from", type=Path, default=ROOT / ".cache" / "models" / "smollm2-135m")
    a = p.parse_args()
    if not (a.tokenizer_from / "tokenizer.json").is_file():
        print(f"no tokenizer.json in {a.tokenizer_from}: run `make model` first", file=sys.stderr)
        return 2
    params = write(a.out, a.size, a.shard_gib, a.tokenizer_from)
    print(f"{a.out}: {params / 1e6:.0f}M parameters, bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
