"""Structured pruning of SmolLM2: perplexity against decode speed for each cut, same run.

Builds the recipe's model once per variant (0..6 whole layers removed, 25% of FFN channels,
a third of the query heads; each through kiln's quality gate against the unpruned fp32 model,
limits open so every figure is reported), then times greedy decode of every engine in
alternating rounds (batch 1, 128 new tokens, EOS ignored) and reports the median per engine
and its ratio to the unpruned one. A benchmark, not a test.

    python benchmarks/bench_prune.py --recipe recipes/smollm2-135m.yaml --out bench-results/bench-prune.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from serve_load import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CAL = {"samples": 8, "seq_len": 256}
VARIANTS = {f"layers-{n}": {"layers": n} for n in range(7)} | {
    "ffn-25": {"ffn_channels": 0.25}, "heads-33": {"heads": 0.34}}


def build(recipe: dict, name: str, prune: dict, work: Path, window: int) -> Path:
    from compiler.cli import main

    r = {**recipe, "name": name, "quality": {"window": window, "max_ppl_increase_pct": 1e9}}
    if any(prune.values()):
        r["prune"] = {**prune, "calibration": CAL}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    if main(["build", str(path), "--out", str(work / "artifacts"), "--quiet"]) != 0:
        raise SystemExit(f"build of {name} failed")
    return work / "artifacts" / name


def decode_rates(artifacts: dict[str, Path], rounds: int, threads: int, tokens: int) -> dict[str, list[float]]:
    from compiler.runtime import load

    engines = {k: load(a, threads=threads) for k, a in artifacts.items()}
    for e in engines.values():
        e.generate(PROMPT, max_new_tokens=4, ignore_eos=True)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(rounds):  # alternating, so drift in the machine hits every engine alike
        for k, e in engines.items():
            rates[k].append(e.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True).timing.decode_tok_s)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/smollm2-135m.yaml")
    ap.add_argument("--work", default=".cache/bench-prune")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--out", default="bench-results/bench-prune.json")
    args = ap.parse_args()
    recipe = yaml.safe_load((ROOT / args.recipe).read_text())
    recipe["source"] = str((ROOT / recipe["source"]).resolve())
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    arts = {n: build(recipe, f"prune-{n}", VARIANTS[n], work, args.window) for n in names}
    rates = decode_rates(arts, args.rounds, args.threads, args.tokens)
    base = statistics.median(rates[names[0]])
    rows = {}
    for n in names:
        m = json.loads((arts[n] / "kiln.json").read_text())
        q, p = m.get("quality") or {}, m.get("pruned") or {}
        size = sum(f.stat().st_size for f in arts[n].iterdir() if f.is_file())
        rows[n] = {"prune": VARIANTS[n], "removed_layers": p.get("removed_layers", []), "perplexity": q.get("perplexity"),
                   "reference_perplexity": q.get("reference_perplexity"), "ppl_increase_pct": q.get("ppl_increase_pct"),
                   "top1_agreement": q.get("top1_agreement"), "mean_kl": q.get("mean_kl"), "bytes": size,
                   "decode_tok_s": statistics.median(rates[n]), "decode_runs": rates[n],
                   "speedup": statistics.median(rates[n]) / base}
        r = rows[n]
        print(f"{n:10s} ppl {r['perplexity'] or 0:8.3f} ({r['ppl_increase_pct'] or 0:+7.2f}%) top-1 {r['top1_agreement'] or 1:.3f} "
              f"decode {r['decode_tok_s']:6.1f} tok/s ({r['speedup']:.2f}x) removed {r['removed_layers']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "threads": args.threads, "tokens": args.tokens,
                               "rounds": args.rounds, "variants": rows}, indent=2))


if __name__ == "__main__":
    main()
