"""What `kiln tune` leaves behind: the table, the Pareto plot, the tuned recipe, and the chosen
point recorded in the chosen artifact (kiln.json `tuned.<workload>` and its engine card).

  <recipe dir>/<name>.<workload>.yaml     the recipe with the chosen scheme and `serve:` settings
  <out>/tune/<name>.<workload>/plot.png   throughput against the workload's latency metric
  <out>/tune/<name>.<workload>/report.json every point, its replays, the choice and why
`kiln serve ARTIFACT --tuned WORKLOAD` reads the record back.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import yaml

from compiler.build.card import render
from compiler.runtime.manifest import read_manifest, write_manifest
from compiler.runtime.verify import record as record_files
from compiler.runtime.settings import RuntimeSettings
from compiler.tune.pareto import Point, describe, primary_metric
from compiler.tune.tune import TuneResult


def report(res: TuneResult, fresh: dict | None = None) -> dict:
    s = res.search
    front = {p.key for p in s.front}
    return {
        "workload": res.workload.name, "workload_file": str(res.workload_file), "targets": describe(res.workload.targets),
        "recipe": str(res.recipe_path), "artifacts": {e.name: str(e.artifact) for e in res.engines},
        "chosen": _point(s.chosen, front), "default": _point(s.default, front), "reason": s.reason, "gain": s.gain,
        "fresh_process": fresh, "dropped": res.dropped, "points": [_point(p, front) for p in s.points],
        "log": s.log, "machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform()},
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _point(p: Point, front: set[str]) -> dict:
    figures = {k: round(v, 2) for k, v in p.latency(["ttft_p99_ms", "itl_p99_ms", "ttft_p50_ms", "itl_p50_ms"]).items()}
    return {"key": p.key, "settings": p.settings, "throughput_tok_s": round(p.throughput, 2), **figures,
            "quality_ppl_increase_pct": p.quality, "replays": len(p.runs), "stopped_early": p.stopped_early,
            "on_front": p.key in front}


def table(res: TuneResult) -> None:
    from rich.console import Console
    from rich.table import Table

    s, w = res.search, res.workload
    t = Table(title=f"kiln tune {res.recipe_path.name} --workload {w.name} ({describe(w.targets)})")
    for col in ("point", "tok/s", "ttft p99 ms", "itl p99 ms", "ppl +%", "replays", ""):
        t.add_column(col, justify="left" if col in ("point", "") else "right", no_wrap=col == "point")
    front = {p.key for p in s.front}
    for p in sorted(s.points, key=lambda p: -p.throughput):
        mark = "chosen" if p is s.chosen else "default" if p is s.default else "front" if p.key in front else ""
        mark += " (stopped early)" if p.stopped_early else ""
        t.add_row(p.key, f"{p.throughput:.0f}", f"{p.latency('ttft_p99_ms'):.0f}", f"{p.latency('itl_p99_ms'):.1f}",
                  "-" if p.quality is None else f"{p.quality:+.1f}", str(len(p.runs)), mark)
    console = Console(stderr=True, width=max(Console(stderr=True).width, 140))
    console.print(t)
    console.print(f"chosen: {s.reason}")
    for line in res.dropped:
        console.print(f"dropped {line}")


def plot(res: TuneResult, path: Path) -> Path:
    """Throughput against the workload's latency metric (itl p99 when it bounds none), the front
    as a line, the target as a dashed line, the default and the choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, w = res.search, res.workload
    metric = primary_metric(w.targets) or "itl_p99_ms"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    engines = sorted({p.settings["engine"] for p in s.points})
    for i, name in enumerate(engines):
        pts = [p for p in s.points if p.settings["engine"] == name]
        ax.scatter([p.latency(metric) for p in pts], [p.throughput for p in pts], s=28, color=f"C{i}", label=f"engine {name}")
    front = _front_2d(s.points, metric)
    ax.step([p.latency(metric) for p in front], [p.throughput for p in front], where="post", color="0.4", lw=1,
            label=f"front: tok/s vs {metric}")
    limit = getattr(w.targets, metric, None)
    if limit:
        ax.axvline(limit, color="red", ls="--", lw=1, label=f"target {metric} {limit:g}")
    for p, style, label in ((s.default, "s", "default"), (s.chosen, "*", f"chosen ({s.gain:.2f}x)")):
        ax.scatter([p.latency(metric)], [p.throughput], marker=style, s=160, facecolors="none", edgecolors="k", label=label)
    ax.set_xlabel(f"{metric} (ms)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{res.recipe_path.stem} on workload {w.name}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _front_2d(points: list[Point], metric: str) -> list[Point]:
    """The points no other beats on both plotted axes (more tok/s at no more latency), by latency."""
    out = [p for p in points if not any(q.throughput >= p.throughput and q.latency(metric) <= p.latency(metric)
                                        and (q.throughput, q.latency(metric)) != (p.throughput, p.latency(metric))
                                        for q in points)]
    return sorted(out, key=lambda p: p.latency(metric))


def tuned_recipe(res: TuneResult) -> Path:
    """recipes/<name>.<workload>.yaml: the chosen engine's recipe with the chosen serve settings."""
    chosen = res.search.chosen
    engine = next(e for e in res.engines if e.name == chosen.settings["engine"])
    data = engine.recipe.resolved()
    data["name"] = f"{res.recipe_path.stem}.{res.workload.name}"
    data["serve"] = serve_settings(chosen.settings["runtime"])
    spec = chosen.settings["runtime"].get("speculate")
    if spec:
        data["speculative"] = {"method": spec, "num_speculative": chosen.settings["runtime"].get("num_speculative")}
    path = res.recipe_path.with_name(f"{res.recipe_path.stem}.{res.workload.name}.yaml")
    head = (f"# Tuned by `kiln tune {res.recipe_path} --workload {res.workload.name}` "
            f"({describe(res.workload.targets)}): {chosen.key}, {res.search.gain:.2f}x the default's throughput.\n")
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(head + yaml.safe_dump(_without_nulls(data), sort_keys=False))
    tmp.replace(path)
    return path


def _without_nulls(value):
    """The recipe as a person would write it: unset (null) fields left out; they take their defaults."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def serve_settings(runtime: dict) -> dict:
    """The runtime settings a recipe's `serve:` and kiln serve take (speculation is `speculative:`)."""
    return RuntimeSettings(**runtime).serve_section()


def record(res: TuneResult, summary: dict) -> Path:
    """The choice, in the chosen artifact's kiln.json (`tuned.<workload>`) and engine card; the
    other candidates' artifacts lose any older record for this workload."""
    chosen = res.search.chosen.settings
    runtime = chosen["runtime"]
    entry = {
        "serve": serve_settings(runtime), "speculate": runtime.get("speculate"), "num_speculative": runtime.get("num_speculative"),
        "point": summary["chosen"], "default": summary["default"], "gain": summary["gain"], "reason": summary["reason"],
        "fresh_process": summary["fresh_process"], "targets": summary["targets"], "finished": summary["finished"],
    }
    for e in res.engines:
        _rewrite(e.artifact, res.workload.name, entry if e.name == chosen["engine"] else None)
    return next(e.artifact for e in res.engines if e.name == chosen["engine"])


def _rewrite(artifact: Path, workload: str, entry: dict | None) -> None:
    """Set (or with None, drop) kiln.json's tuned.<workload>, re-render the card, re-record its hash."""
    before = read_manifest(artifact)
    if entry is None and workload not in before.tuned:
        return
    manifest = before.with_tuned(workload, entry)
    card = artifact / "README.md"
    card.write_text(render(manifest.data))
    record_files(manifest.data, [card])
    write_manifest(artifact, manifest)
