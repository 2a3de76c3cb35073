"""Re-measure a tune's choice against the default in a fresh process (no warm caches, no state of
the search): `python -m compiler.tune.check REPORT.json [--rounds 2]`.

Loads the default's and the chosen point's engines anew, rebuilds the same seeded trace, and
replays default, chosen, default, chosen, ... (side by side, so drift hits both alike). Prints
one JSON line: each side's replays, and the gain as the median of the per-round throughput ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path


def check(report: dict, rounds: int) -> dict:
    from compiler.runtime import load
    from compiler.runtime.settings import RuntimeSettings
    from compiler.tune.replay import replay, workload_trace
    from compiler.tune.workload import load_workload

    w = load_workload(report["workload_file"])
    sides = {}
    for side in ("default", "chosen"):
        settings = report[side]["settings"]
        rs = RuntimeSettings(**settings["runtime"])
        sides[side] = (load(report["artifacts"][settings["engine"]], threads=rs.threads), rs)
    trace = workload_trace(sides["default"][0], w)
    runs = {"default": [], "chosen": []}
    for _ in range(rounds):
        for side, (engine, rs) in sides.items():
            runs[side].append(replay(engine, trace, w, rs))
    ratios = [c.throughput_tok_s / d.throughput_tok_s for d, c in zip(runs["default"], runs["chosen"])]
    return {"rounds": rounds, "gain": statistics.median(ratios),
            **{side: [asdict(m) for m in ms] for side, ms in runs.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    print(json.dumps(check(json.loads(a.report.read_text()), a.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
