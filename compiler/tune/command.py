"""The `kiln tune` command: tune, re-measure the choice in a fresh process, write what it found.

    kiln tune recipes/smollm2-135m.yaml --workload chat --budget 10m
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from compiler.errors import KilnError

_UNITS = {"s": 1, "m": 60, "h": 3600}


def duration(text: str) -> float:
    """'90', '90s', '10m', '1h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise KilnError(f"--budget {text!r} is not a duration", "give seconds or a number with s, m or h: 30s, 10m, 1h")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def run(args) -> int:
    from rich.console import Console

    from compiler.tune import report as rep
    from compiler.tune.tune import DEFAULT_SCHEMES, KV_VARIANTS, tune

    console = Console(stderr=True, quiet=args.quiet)
    budget = duration(args.budget)
    schemes = tuple(s.strip() for s in (args.schemes.split(",") if args.schemes is not None else DEFAULT_SCHEMES) if s.strip())
    from compiler.passes.quant import SCHEMES

    known = [s for s in SCHEMES if s != "gguf"] + list(KV_VARIANTS)  # gguf needs its own file: not a variant
    if bad := [s for s in schemes if s not in known]:
        raise KilnError(f"--schemes: unknown scheme {bad[0]!r}", f"choose from {', '.join(known)} (comma-separated)")
    with console.status("tuning") as status:
        def say(line: str) -> None:
            console.log(line)
            status.update(line[:100])

        res = tune(Path(args.recipe), args.workload, Path(args.out), budget, schemes, say)
    out_dir = Path(args.out) / "tune" / f"{Path(args.recipe).stem}.{res.workload.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = rep.report(res)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if not args.no_check and res.search.chosen is not res.search.default:
        with console.status("re-measuring the choice against the default in a fresh process"):
            summary["fresh_process"] = fresh_check(out_dir / "report.json", args.check_rounds)
        (out_dir / "report.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if not args.quiet:
        rep.table(res)
    png = rep.plot(res, out_dir / "plot.png")
    recipe = rep.tuned_recipe(res)
    artifact = rep.record(res, summary)
    fresh = summary.get("fresh_process")
    line = {"workload": res.workload.name, "chosen": res.search.chosen.key, "gain": round(res.search.gain, 3),
            "fresh_process_gain": round(fresh["gain"], 3) if fresh else None, "tuned_recipe": str(recipe),
            "artifact": str(artifact), "plot": str(png), "report": str(out_dir / "report.json")}
    if args.json:
        print(json.dumps(line))
    elif not args.quiet:
        again = f", {fresh['gain']:.2f}x re-measured in a fresh process" if fresh else ""
        print(f"{res.workload.name}: {res.search.chosen.key} ({res.search.gain:.2f}x the default{again})\n"
              f"  tuned recipe {recipe}\n  plot {png}\n  serve with: kiln serve {artifact} --tuned {res.workload.name}")
    return 0


def fresh_check(report: Path, rounds: int) -> dict:
    """compiler.tune.check in a child process: the choice against the default, side by side."""
    out = subprocess.run([sys.executable, "-m", "compiler.tune.check", str(report), "--rounds", str(rounds)],
                         capture_output=True, text=True)
    if out.returncode:
        raise KilnError(f"re-measuring the choice in a fresh process failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}",
                        "run `python -m compiler.tune.check` on the report to see why, or pass --no-check")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_parser(cmd) -> None:
    t = cmd("tune", run, "choose build and serving settings for a workload (workloads/*.yaml)")
    t.add_argument("recipe")
    t.add_argument("--workload", required=True, help="a workload name (chat, summarise, generate) or a YAML file")
    t.add_argument("--budget", default="10m", help="time for the whole tune, builds included (default 10m)")
    t.add_argument("--schemes", help="candidates to build beside the recipe, comma-separated: quantisation schemes, or "
                                     "KV rows on kiln's attention kernel (kv-int8, kv-fp8, kv-fp16, kv-bf16, kiln-attention) "
                                     "(default int8-wo,int4-rtn; '' for none)")
    t.add_argument("--out", default="artifacts", help="artifact root for the candidate engines (default: artifacts)")
    t.add_argument("--no-check", action="store_true", help="skip re-measuring the choice in a fresh process")
    t.add_argument("--check-rounds", type=int, default=2, help="side-by-side rounds of that re-measurement (default 2)")
