"""`make bench` (speculative rows): decode speed with and without speculative decoding, side by side.

SmolLM2-135M, batch 1, greedy, 128 new tokens, the same token ids for every engine:
  grounded  a ~600-token passage from offline text and an instruction to restate it
            (the summarisation / extraction shape, where prompt lookup finds its proposals)
  free      free-form chat prompts (where proposals rarely match: it must not slow down)
Engines, each run in its own process, interleaved `--reps` times (medians):
  kiln fp32 and int4, plain and with prompt lookup (`--speculate ngram`); kiln fp32 with the int4
  build drafting (`--speculate draft`); transformers fp32 plain and with its prompt lookup
  (`prompt_lookup_num_tokens`); onnxruntime-genai fp32 and int4 plain (it has no speculation;
  built by its own builder, skipped when it is not installed).
Reported: decode tok/s (tokens after the first over the time after the first), the ratio to the
same engine without speculation, acceptance, and whether the tokens equal the plain run's.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SOURCE, build_genai, have_genai  # noqa: E402
from serve_load import PromptSource, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEW = 128
ARTIFACTS = {"fp32": ROOT / "artifacts" / "smollm2-135m", "int4": ROOT / "artifacts" / "smollm2-135m-int4"}
RECIPES = {"fp32": ROOT / "recipes" / "smollm2-135m.yaml", "int4": ROOT / "recipes" / "smollm2-135m-int4.yaml"}
INSTRUCTIONS = ("Repeat the text above word for word.", "Quote the first part of the text above exactly.")
FREE = ("Write a short story about a dragon who learns to bake bread.", "What are three good habits for staying healthy?")


def prompts() -> dict[str, list[list[int]]]:
    """Token ids of each prompt set, through kiln's chat template (identical for every engine)."""
    from compiler.runtime.text import Text

    src, text = PromptSource(SOURCE / "tokenizer.json"), Text(ARTIFACTS["fp32"])
    chat = lambda content: text.prompt_ids([{"role": "user", "content": content}], True)  # noqa: E731
    return {"grounded": [chat(src.take(600) + "\n\n" + ins) for ins in INSTRUCTIONS], "free": [chat(f) for f in FREE]}


# ------------------------------------------------------------------ one engine, in a child process

def run_kiln(artifact: str, speculate: str | None, draft: str | None, ids: list[list[int]], threads: int) -> list[dict]:
    from compiler.runtime import Draft, load
    from compiler.runtime.core import EngineCore, SchedulerConfig
    from compiler.runtime.generation import GenerationConfig
    from compiler.runtime.speculative import resolve

    engine = load(artifact, threads=threads, config_entries={"session.force_spinning_stop": "1"} if draft else None)  # as kiln run --draft
    spec = resolve(Draft(draft) if draft else (speculate or "off"), engine)
    out = []
    for i, x in enumerate([ids[0], *ids]):  # the first is a warm-up
        core = EngineCore(engine, SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=4096, speculative=spec))
        core.add_request(x, GenerationConfig(max_new_tokens=NEW))
        while core.has_work:
            for o in core.step():
                if o.finished:
                    g = o.generation
        if i:
            t = g.timing
            out.append({"tokens": g.token_ids, "decode_tok_s": t.decode_tok_s, "proposed": t.proposed, "accepted": t.accepted,
                        "ttft_ms": t.prefill_ms, "total_s": t.prefill_ms / 1e3 + t.decode_s})
    return out


def run_transformers(lookup: bool, ids: list[list[int]], threads: int) -> list[dict]:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32).eval()
    extra = {"prompt_lookup_num_tokens": 10} if lookup else {}
    out = []
    with torch.inference_mode():
        for i, x in enumerate([ids[0], *ids]):
            t = torch.tensor([x])
            t0 = time.perf_counter()
            model(t)  # the prefill alone, to take it out of the decode time
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            seq = model.generate(t, max_new_tokens=NEW, do_sample=False, **extra)[0, len(x):].tolist()
            total = time.perf_counter() - t0
            if i:
                out.append({"tokens": seq, "decode_tok_s": (len(seq) - 1) / max(total - prefill, 1e-9)})
    return out


def run_genai(model_dir: str, ids: list[list[int]], threads: int) -> list[dict]:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(model_dir)
    out = []
    for i, x in enumerate([ids[0], *ids]):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(x) + NEW, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([x], dtype=np.int32))
        gen.generate_next_token()
        t1, n = time.perf_counter(), 1
        while not gen.is_done() and n < NEW:
            gen.generate_next_token()
            n += 1
        if i:
            out.append({"tokens": [int(t) for t in gen.get_sequence(0)][len(x):], "decode_tok_s": (n - 1) / (time.perf_counter() - t1)})
    return out


def child(spec: dict, ids_file: Path, threads: int) -> list[dict]:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec), "--ids", str(ids_file), "--threads", str(threads)],
                         capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{spec}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one(spec: dict, ids: list[list[int]], threads: int) -> list[dict]:
    if spec["kind"] == "kiln":
        return run_kiln(spec["artifact"], spec.get("speculate"), spec.get("draft"), ids, threads)
    if spec["kind"] == "transformers":
        return run_transformers(spec["lookup"], ids, threads)
    return run_genai(spec["artifact"], ids, threads)


# ------------------------------------------------------------------ the table

def engines(genai: dict[str, str]) -> dict[str, tuple[dict, str | None]]:
    """name -> (child spec, the plain engine it is compared with)."""
    fp32, int4 = str(ARTIFACTS["fp32"]), str(ARTIFACTS["int4"])
    e = {"kiln fp32": ({"kind": "kiln", "artifact": fp32}, None),
         "kiln fp32 ngram": ({"kind": "kiln", "artifact": fp32, "speculate": "ngram"}, "kiln fp32"),
         "kiln int4": ({"kind": "kiln", "artifact": int4}, None),
         "kiln int4 ngram": ({"kind": "kiln", "artifact": int4, "speculate": "ngram"}, "kiln int4"),
         "kiln fp32 draft int4": ({"kind": "kiln", "artifact": fp32, "draft": int4}, "kiln fp32"),
         "transformers": ({"kind": "transformers", "lookup": False}, None),
         "transformers lookup": ({"kind": "transformers", "lookup": True}, "transformers")}
    e.update({f"genai {p}": ({"kind": "genai", "artifact": d}, None) for p, d in genai.items()})
    return e


def summarise(runs: dict[str, list[list[dict]]], table: dict) -> dict:
    """Per engine and prompt set: median decode tok/s, ratio to its plain engine, acceptance,
    and token identity with the plain engine; for kiln also TTFT and the whole request's time
    (prefill + decode) and its ratio, since a draft engine reads the prompt during the prefill."""
    res = {}
    for name, (_, plain) in table.items():
        reps = runs[name]
        tok_s = statistics.median(statistics.mean(r["decode_tok_s"] for r in rep) for rep in reps)
        row = {"decode_tok_s": round(tok_s, 2)}
        proposed = sum(r.get("proposed", 0) for r in reps[0])
        if proposed:
            row["acceptance"] = round(sum(r["accepted"] for r in reps[0]) / proposed, 3)
        if "ttft_ms" in reps[0][0]:  # kiln: the prompt's cost (a draft reads it too) and the whole request
            row["ttft_ms"] = round(statistics.median(statistics.mean(r["ttft_ms"] for r in rep) for rep in reps), 1)
            row["total_s"] = round(statistics.median(statistics.mean(r["total_s"] for r in rep) for rep in reps), 3)
        if plain is not None:
            row["speedup"] = round(tok_s / res[plain]["decode_tok_s"], 2)
            if "total_s" in row:
                row["e2e_speedup"] = round(res[plain]["total_s"] / row["total_s"], 2)
            row["identical"] = [r["tokens"] for r in reps[0]] == [r["tokens"] for r in runs[plain][0]]
        res[name] = row
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench-results" / "bench-speculative.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(json.loads(a.one), json.loads(Path(a.ids).read_text()), a.threads)))
        return 0
    missing = []
    for key, art in ARTIFACTS.items():  # kiln build skips an up-to-date artifact
        if not (art / "engine.json").is_file():
            out = subprocess.run([sys.executable, "-m", "compiler.cli", "build", str(RECIPES[key]), "--quiet"], cwd=ROOT,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                missing.append(key)
                print(f"{key} rows skipped: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    if "fp32" in missing:
        return 2
    sets = prompts()
    report = {"machine": machine(), "threads": a.threads, "reps": a.reps, "new_tokens": NEW, "skipped": missing,
              "prompt_tokens": {k: [len(x) for x in v] for k, v in sets.items()}, "sets": {}}
    with tempfile.TemporaryDirectory(prefix="kiln-spec-") as tmp:
        genai = {}
        if have_genai():
            genai = {prec: build_genai(prec, Path(tmp) / f"genai-{prec}", a.threads)["artifact"] for prec in ("fp32", "int4")}
        else:
            print("onnxruntime-genai is not installed: its rows are skipped", file=sys.stderr)
        table = {name: e for name, e in engines(genai).items() if not any(f" {m}" in name for m in missing)}
        for key, ids in sets.items():
            ids_file = Path(tmp) / f"{key}.json"
            ids_file.write_text(json.dumps(ids))
            runs: dict[str, list] = {name: [] for name in table}
            for _ in range(a.reps):  # interleaved: drift on a noisy machine hits every engine alike
                for name, (spec, _) in table.items():
                    runs[name].append(child(spec, ids_file, a.threads))
                    print(f"[{key}] {name}: {statistics.mean(r['decode_tok_s'] for r in runs[name][-1]):.1f} tok/s",
                          file=sys.stderr, flush=True)
            report["sets"][key] = summarise(runs, table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    print(f"\n{'set':9} {'engine':22} {'decode tok/s':>12} {'speedup':>8} {'accept':>7} {'identical':>9} "
          f"{'TTFT ms':>8} {'request s':>9} {'e2e':>5}")
    for key, rows in report["sets"].items():
        for name, r in rows.items():
            print(f"{key:9} {name:22} {r['decode_tok_s']:>12} {r.get('speedup', ''):>8} {r.get('acceptance', ''):>7} "
                  f"{str(r.get('identical', '')):>9} {r.get('ttft_ms', ''):>8} {r.get('total_s', ''):>9} "
                  f"{r.get('e2e_speedup', ''):>5}")
    print(f"threads {report['threads']}, median of {report['reps']}; speedup: decode over the same engine without "
          f"speculation; e2e: the whole request ({NEW} new tokens) over the same")


if __name__ == "__main__":
    sys.exit(main())
