"""`kiln tune RECIPE --workload W`: build the candidate engines, replay the workload's trace on
each with candidate runtime settings, and pick the best point for the workload's target.

Candidates: the recipe as written, and one variant per `schemes` entry (the recipe with that
quantisation scheme, or with KV rows of another dtype on kiln's attention kernel, and the recipe's
quality limits, or MAX_PPL_INCREASE_PCT when it has none);
a variant whose build fails its quality gate is dropped and the reason kept. Builds go through
the build cache, so a repeated tune rebuilds nothing. Runtime settings (runtime_candidates) vary
the sequences run at once, the prefill token budget of a step, prompt-lookup speculation and the
prefix cache around kiln serve's defaults; the first candidate is always the recipe's engine with
those defaults. The Search (pareto.py) measures them within the budget, interleaved with the best.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from compiler.errors import KilnError
from compiler.build.recipe import Recipe, load_recipe, parse_recipe
from compiler.tune.pareto import Search, SearchResult
from compiler.runtime.settings import RuntimeSettings
from compiler.tune.replay import replay, workload_trace
from compiler.tune.workload import Workload, load_workload, workload_path

MAX_PPL_INCREASE_PCT = 15.0  # the gate of quantised candidates when the recipe sets none
DEFAULT_SCHEMES = ("int8-wo", "int4-rtn")  # no calibration: cheap to build, and the gate decides
KV_VARIANTS = {"kv-int8": "int8", "kv-fp8": "fp8", "kv-fp16": "fp16", "kv-bf16": "bf16", "kiln-attention": "fp32"}


@dataclass
class Engine:
    name: str  # the candidate's name: "recipe" or its scheme
    recipe: Recipe
    artifact: Path
    quality: float | None  # perplexity increase (%) against fp32; None for the recipe's own engine if unquantised
    loaded: dict = field(default_factory=dict)  # threads -> the loaded engine


@dataclass
class TuneResult:
    workload: Workload
    workload_file: Path
    recipe_path: Path
    engines: list[Engine]
    dropped: list[str]  # candidates left out, each with why
    search: SearchResult


def variants(recipe: Recipe, schemes: tuple[str, ...]) -> list[tuple[str, Recipe]]:
    """The recipe, then a copy per scheme (named <recipe>-<scheme>) with a gate: a quantisation
    scheme (unquantised recipes only: a quantised one is its own candidate), or KV rows of another
    dtype read by kiln's attention kernel (KV_VARIANTS: kv-int8, ..., kiln-attention for fp32 rows)."""
    out = [("recipe", recipe)]
    data = recipe.resolved()
    quality = {**data.get("quality", {}), "gate": True}
    if quality.get("max_ppl_increase_pct") is None:
        quality["max_ppl_increase_pct"] = MAX_PPL_INCREASE_PCT
    for scheme in schemes:
        if scheme in KV_VARIANTS:
            change = {"kv_cache": {"dtype": KV_VARIANTS[scheme], "attention": "kiln"}}
        elif recipe.quantization is None:
            change = {"quantization": {"scheme": scheme}}
        else:
            continue
        variant = {**data, "name": f"{recipe.name}-{scheme}", **change, "quality": quality}
        out.append((scheme, parse_recipe(variant, f"{recipe.name} with {scheme}")))
    return out


def build_candidates(recipe: Recipe, schemes: tuple[str, ...], out_root: Path, say: Callable[[str], None]) -> tuple[list[Engine], list[str]]:
    """Build (or find up to date) each variant; the ones whose gate fails are dropped with why."""
    from compiler.build.driver import build

    engines, dropped = [], []
    for name, r in variants(recipe, schemes):
        try:
            manifest = build(r, out_root, progress=False)
        except KilnError as e:
            if name == "recipe":
                raise
            dropped.append(f"{name}: {e}")
            say(f"dropped {name}: {e}")
            continue
        quality = (manifest.get("quality") or {}).get("ppl_increase_pct")
        say(f"engine {name}: {out_root / r.name}" + (f" (perplexity {quality:+.2f}%)" if quality is not None else ""))
        engines.append(Engine(name, r, out_root / r.name, quality))
    return engines, dropped


def runtime_candidates(w: Workload, cores: int) -> list[RuntimeSettings]:
    """kiln serve's defaults first, then one change at a time around the workload's concurrency,
    the changes its kind usually wants first: a larger prefill budget for prompt-heavy traffic,
    speculation for reply-heavy traffic."""
    c = w.arrival.concurrency or 8
    prefix = 4096 if w.shared_prefix > 0 else 0

    def at(**kw) -> RuntimeSettings:
        return RuntimeSettings(**{"max_num_seqs": c, "max_num_batched_tokens": 512, "prefix_cache_tokens": prefix, **kw})

    budgets = [at(max_num_batched_tokens=t) for t in (2048, 128)]
    speculation = [at(speculate="ngram", num_speculative=4), at(max_num_seqs=1, speculate="ngram", num_speculative=4)]
    prompt_heavy = w.input_tokens.mean() > 4 * w.output_tokens.mean()
    out = [RuntimeSettings(), at(), *(budgets + speculation if prompt_heavy else speculation + budgets)]
    out += [at(max_num_seqs=n) for n in (1, 2) if n < c]
    if cores >= 4:
        out.append(at(threads=cores // 2))
    return list({s.key(): s for s in out}.values())  # in order; a key names every field


def candidates(engines: list[Engine], w: Workload, cores: int) -> list[tuple[str, dict]]:
    """(key, settings): each runtime candidate on every engine, runtime setting by runtime setting
    (so a short budget has still seen every engine at kiln serve's defaults); the recipe's engine
    with the defaults first, the point every gain is measured against."""
    out = []
    for s in runtime_candidates(w, cores):
        out += [(f"{e.name}/{s.key()}", {"engine": e.name, "runtime": s.as_dict()}) for e in engines]
    return out


def tune(recipe_path: Path, workload_spec: str, out_root: Path, budget_s: float, schemes: tuple[str, ...] = DEFAULT_SCHEMES,
         say: Callable[[str], None] = lambda line: None) -> TuneResult:
    import time

    from compiler.runtime import load

    start = time.monotonic()
    recipe, w = load_recipe(recipe_path), load_workload(workload_spec)
    if recipe.backend != "onnxruntime" or recipe.onnxruntime.device != "cpu" or recipe.parallel.world_size > 1:
        raise KilnError("kiln tune replays the workload on this machine's CPU: it tunes single-rank onnxruntime cpu recipes",
                        "tune the onnxruntime variant of the model (backend: onnxruntime, device: cpu)")
    engines, dropped = build_candidates(recipe, schemes, out_root, say)
    by_name = {e.name: e for e in engines}

    def engine_of(name: str, threads: int | None):
        e = by_name[name]
        if threads not in e.loaded:
            e.loaded[threads] = load(e.artifact, threads=threads)
        return e.loaded[threads]

    trace = workload_trace(engine_of("recipe", None), w)

    def measure(settings: dict):
        rs = RuntimeSettings(**settings["runtime"])
        return replay(engine_of(settings["engine"], rs.threads), trace, w, rs)

    cands = candidates(engines, w, os.cpu_count() or 2)
    say(f"{len(cands)} candidates on {len(engines)} engines, {w.requests} requests a replay, "
        f"budget {budget_s - (time.monotonic() - start):.0f} s left after the builds")
    search = Search(cands, measure, w.targets, max(budget_s - (time.monotonic() - start), 0.0), on_progress=say,
                    quality=lambda s: by_name[s["engine"]].quality)
    return TuneResult(w, workload_path(workload_spec), Path(recipe_path), engines, dropped, search.run())
