"""`make bench`: transformers eager fp32 vs the kiln ONNX Runtime fp32 engine, side by side.

SmolLM2-135M, batch 1, a 128-token prompt and 128 new tokens (greedy), the same thread count
for both. Each measurement runs in its own process (so peak RSS is that engine's alone); the
two are interleaved `--reps` times and the median reported, with kiln/transformers ratios. The
kiln build itself is timed too (wall time and peak RSS of `kiln build`). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / ".cache" / "models" / "smollm2-135m"
RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
PROMPT_TOKENS = NEW_TOKENS = 128


def prompt_ids() -> list[int]:
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(SOURCE / "tokenizer.json"))
    return tok.encode(topics["if"] + topics["while"] + topics["for"]).ids[:PROMPT_TOKENS]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_transformers(threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids()])
    with torch.inference_mode():
        model(ids[:, :8])  # warm-up
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t1
    return {"prefill_ms": prefill * 1e3, "decode_tok_s": (NEW_TOKENS - 1) / decode, "peak_rss_bytes": peak_rss()}


def run_kiln(threads: int, artifact: str) -> dict:
    from compiler.runtime import load

    engine = load(artifact, threads=threads)
    prompt = engine.text.decode(prompt_ids())
    assert len(engine.text.encode(prompt)) == PROMPT_TOKENS
    engine.generate(prompt, max_new_tokens=4, stop_token_ids=())  # warm-up
    gen = engine.generate(prompt, max_new_tokens=NEW_TOKENS, stop_token_ids=())
    t = gen.timing
    return {"prefill_ms": t.prefill_ms, "decode_tok_s": t.decode_tok_s, "peak_rss_bytes": peak_rss()}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_once(out_root: Path) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "compiler.cli", "build", str(RECIPE), "--out", str(out_root), "--json", "--quiet"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return {"build_s": wall, "build_peak_rss_bytes": info["build"]["peak_rss_bytes"], "artifact": info["artifact"]}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench-results/bench.json")
    p.add_argument("--one", choices=["transformers", "kiln"], help=argparse.SUPPRESS)
    p.add_argument("--artifact", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        res = run_transformers(a.threads) if a.one == "transformers" else run_kiln(a.threads, a.artifact)
        print(json.dumps(res))
        return 0

    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        builds = [build_once(Path(tmp) / f"b{i}") for i in range(a.reps)]
        hf_runs, kiln_runs = [], []
        for _ in range(a.reps):
            hf_runs.append(child(["--one", "transformers", "--threads", str(a.threads)]))
            kiln_runs.append(child(["--one", "kiln", "--threads", str(a.threads), "--artifact", builds[0]["artifact"]]))
    result = {
        "model": "SmolLM2-135M-Instruct fp32", "threads": a.threads, "reps": a.reps,
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "transformers": median_of(hf_runs), "kiln": {**median_of(kiln_runs), **median_of(builds)},
        "runs": {"transformers": hf_runs, "kiln": kiln_runs, "builds": builds},
    }
    result["ratios"] = {
        "decode_speedup": result["kiln"]["decode_tok_s"] / result["transformers"]["decode_tok_s"],
        "prefill_speedup": result["transformers"]["prefill_ms"] / result["kiln"]["prefill_ms"],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    hf, k = r["transformers"], r["kiln"]
    t = Table(title=f"{r['model']}, {r['threads']} threads, median of {r['reps']} "
                    f"({r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, batch 1)")
    for col in ("", "transformers eager", "kiln onnxruntime", "kiln / transformers"):
        t.add_column(col, justify="right")
    t.add_row("prefill (ms)", f"{hf['prefill_ms']:.0f}", f"{k['prefill_ms']:.0f}", f"{r['ratios']['prefill_speedup']:.2f}x faster")
    t.add_row("decode (tok/s)", f"{hf['decode_tok_s']:.1f}", f"{k['decode_tok_s']:.1f}", f"{r['ratios']['decode_speedup']:.2f}x")
    t.add_row("peak RSS (GiB)", f"{hf['peak_rss_bytes'] / 2**30:.2f}", f"{k['peak_rss_bytes'] / 2**30:.2f}", "")
    t.add_row("build (s)", "-", f"{k['build_s']:.1f}", "")
    t.add_row("build peak RSS (GiB)", "-", f"{k['build_peak_rss_bytes'] / 2**30:.2f}", "")
    Console().print(t)


if __name__ == "__main__":
    sys.exit(main())
