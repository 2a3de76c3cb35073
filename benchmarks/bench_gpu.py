"""`make bench-gpu`: kiln's ONNX Runtime CUDA engines against transformers eager bf16 on one GPU,
offline. Models: SmolLM2-135M (the offline checkpoint) and a Llama-3-8B-shaped model with random
weights written locally from a config (no download). Each at fp16 and int4 (RTN g128 on the fp16
graph), batch 1 and 8. Reports prefill ms (128 and 2048 tokens), decode tok/s, and decode as a
fraction of the HBM roofline (weight bytes per token / measured device copy bandwidth).
Results: bench-results/bench-gpu.json and a table; it refuses to run without a CUDA provider.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), from torch."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t)


def random_llama(out: Path) -> Path:
    """An 8B-shaped Llama with random bf16 weights and SmolLM2's tokenizer files (offline)."""
    import shutil

    import torch
    import transformers

    cfg = transformers.LlamaConfig(**LLAMA3_8B)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(ROOT / ".cache" / "models" / "smollm2-135m" / f, out / f)
    return out


def build(source: Path, name: str, precision: str, int4: bool, out: Path, max_seq: int) -> Path:
    from compiler.build.driver import build as kiln_build
    from compiler.build.recipe import parse_recipe

    recipe = {"schema": 1, "name": name, "source": str(source), "max_seq": max_seq, "max_batch": 8,
              "onnxruntime": {"device": "cuda", "precision": precision, "graph": "contrib"}}
    if int4:
        recipe["quantization"] = {"scheme": "int4-rtn", "group_size": 128}
        recipe["quality"] = {"window": 256}
    kiln_build(parse_recipe(recipe), out, progress=False)
    return out / name


def measure(artifact: Path, batch: int, prompt: int, new: int = 64) -> dict:
    from compiler.runtime import load

    engine = load(artifact)
    s = engine.session
    ids = np.random.default_rng(0).integers(100, 1000, (batch, prompt))
    io = s.binding(s.new_cache(batch))
    s.step(io, ids, np.broadcast_to(np.arange(prompt), ids.shape))  # warm-up (and graph capture below)
    io = s.binding(s.new_cache(batch))
    t = time.perf_counter()
    s.step(io, ids, np.broadcast_to(np.arange(prompt), ids.shape))
    prefill = time.perf_counter() - t
    tok = np.full((batch, 1), 5)
    s.step(io, tok, np.full((batch, 1), prompt))  # captures the decode graph
    t = time.perf_counter()
    for i in range(new):
        s.step(io, tok, np.full((batch, 1), prompt + 1 + i))
    decode = (time.perf_counter() - t) / new
    return {"prefill_ms": round(prefill * 1e3, 2), "decode_tok_s": round(batch / decode, 1), "step_s": decode}


def measure_transformers(source: Path, batch: int, prompt: int, new: int = 64) -> dict:
    """transformers eager bf16 on the same GPU: prefill, then decode with its KV cache."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()
    ids = torch.randint(100, 1000, (batch, prompt), device="cuda")
    with torch.no_grad():
        model(ids, use_cache=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t
        past, tok = out.past_key_values, torch.full((batch, 1), 5, device="cuda")
        t = time.perf_counter()
        for _ in range(new):
            past = model(tok, past_key_values=past, use_cache=True).past_key_values
        torch.cuda.synchronize()
        decode = (time.perf_counter() - t) / new
    del model
    torch.cuda.empty_cache()
    return {"prefill_ms": round(prefill * 1e3, 2), "decode_tok_s": round(batch / decode, 1)}


def main() -> int:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("make bench-gpu needs onnxruntime-gpu and an NVIDIA GPU (pip install 'kiln[cuda]')", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench-results" / "bench-gpu.json"))
    p.add_argument("--skip-8b", action="store_true")
    a = p.parse_args()
    import torch

    bw = copy_bandwidth()
    report = {"gpu": torch.cuda.get_device_name(), "driver": torch.version.cuda, "copy_bandwidth_gbs": round(bw / 1e9, 1), "rows": []}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-gpu.") as tmp:
        sources = {"SmolLM2-135M": ROOT / ".cache" / "models" / "smollm2-135m"}
        if not a.skip_8b:
            sources["Llama-3-8B-shaped"] = random_llama(Path(tmp) / "llama8b")
        for model, src in sources.items():
            for batch in (1, 8):
                hf = {f"prefill_{n}_ms": measure_transformers(src, batch, n)["prefill_ms"] for n in (128, 2048)}
                row = {"model": model, "engine": "transformers bf16", "batch": batch, **hf,
                       "decode_tok_s": measure_transformers(src, batch, 128)["decode_tok_s"]}
                report["rows"].append(row)
                print(row, flush=True)
            for precision, int4 in (("float16", False), ("float16", True)):
                art = build(src, f"{model}-{'int4' if int4 else 'fp16'}".lower(), precision, int4, Path(tmp) / "artifacts", 2304)
                weight_bytes = sum(f.stat().st_size for f in art.glob("model.onnx*"))
                for batch in (1, 8):
                    row = {"model": model, "engine": "int4" if int4 else "fp16", "batch": batch}
                    row.update({f"prefill_{n}_ms": measure(art, batch, n)["prefill_ms"] for n in (128, 2048)})
                    d = measure(art, batch, 128)
                    row["decode_tok_s"] = d["decode_tok_s"]
                    row["roofline_fraction"] = round((weight_bytes / bw) / d["step_s"], 3)
                    report["rows"].append(row)
                    print(row, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
