"""`make bench` (parallel part): decode tok/s of multi-rank engines on CPU against one rank.

CPU tensor parallelism is for correctness: on a 2-core machine the ranks share the cores and
every layer adds two all-reduces (gloo over loopback) and an ONNX Runtime call per graph part,
so these figures show the cost of the collectives, not a speed-up. Models: SmolLM2-135M at
tp=1 and tp=3 (9 query / 3 KV heads divide by 3, not 2), and a random-weight Llama of the
same size with 8 / 4 heads at tp=1 and tp=2. Prompt of 128 tokens, 64 new tokens, greedy,
EOS ignored; the same total thread count for every engine; medians of --reps interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOLLM2 = ROOT / ".cache" / "models" / "smollm2-135m"
NEW_TOKENS = 64


def make_llama(out: Path) -> Path:
    """SmolLM2's sizes with 8 query / 4 KV heads of 64 dims (hidden 512), random weights, offline."""
    import shutil

    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(SMOLLM2 / f, out / f)
    return out


def build(source: Path, out_root: Path, name: str, tp: int) -> Path:
    recipe = out_root / f"{name}.json"
    recipe.write_text(json.dumps({"schema": 1, "name": name, "source": str(source), "max_seq": 512, "max_batch": 1,
                                  "parallel": {"tp": tp}}))
    subprocess.run([sys.executable, "-m", "compiler.cli", "build", str(recipe), "--out", str(out_root), "--quiet"],
                   check=True, cwd=ROOT)
    return out_root / name


def one(artifact: str, out: str) -> None:
    """Run by each rank: generate; rank 0 writes its timing to out."""
    import os

    from compiler.runtime import load
    from benchmarks.bench import prompt_ids

    engine = load(artifact)
    prompt = engine.text.decode(prompt_ids())
    engine.generate(prompt, max_new_tokens=4, stop_token_ids=())  # warm-up
    t = engine.generate(prompt, max_new_tokens=NEW_TOKENS, stop_token_ids=()).timing
    if os.environ.get("RANK", "0") == "0":
        Path(out).write_text(json.dumps({"prefill_ms": t.prefill_ms, "decode_tok_s": t.decode_tok_s}))


def measure(artifact: Path, tp: int, threads: int, tmp: Path) -> dict:
    from compiler.runtime.launch import launch

    out = tmp / "timing.json"
    argv = [__file__, "--one", str(artifact), "--result", str(out)]
    if tp == 1:
        subprocess.run([sys.executable, *argv, "--threads", str(threads)], check=True, cwd=ROOT)
    elif launch(tp, argv, timeout=900) != 0:
        raise SystemExit(f"{artifact}: ranks failed")
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2, help="total threads (each of tp ranks gets threads / tp, at least 1)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench-results/bench-parallel.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        import os

        os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
        one(a.one, a.result)
        return 0
    with tempfile.TemporaryDirectory(prefix="kiln-bench-parallel-") as tmp:
        root = Path(tmp)
        llama = make_llama(root / "llama-8h")
        engines = {("SmolLM2-135M", 1): build(SMOLLM2, root, "smollm2-tp1", 1),
                   ("SmolLM2-135M", 3): build(SMOLLM2, root, "smollm2-tp3", 3),
                   ("Llama 8/4 heads, SmolLM2 size", 1): build(llama, root, "llama-tp1", 1),
                   ("Llama 8/4 heads, SmolLM2 size", 2): build(llama, root, "llama-tp2", 2)}
        runs: dict = {k: [] for k in engines}
        for _ in range(a.reps):  # interleaved
            for (model, tp), art in engines.items():
                runs[(model, tp)].append(measure(art, tp, a.threads, root))
    rows = [{"model": m, "tp": tp, "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
             "prefill_ms": statistics.median(r["prefill_ms"] for r in rs)} for (m, tp), rs in runs.items()]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["tp"] == 1)
        r["decode_vs_tp1"] = r["decode_tok_s"] / base["decode_tok_s"]
        print(f"{r['model']:32s} tp={r['tp']}  prefill {r['prefill_ms']:7.0f} ms  decode {r['decode_tok_s']:6.1f} tok/s "
              f"({r['decode_vs_tp1']:.2f}x tp=1)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"threads": a.threads, "reps": a.reps, "new_tokens": NEW_TOKENS, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
