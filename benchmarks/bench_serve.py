"""`make bench-serve`: kiln serve against vLLM's CPU build, same checkpoint, fp32, same threads.

Scenarios (streaming /v1/completions, temperature 0, the same prompts and max_tokens for both):
  a  1 client, 128-token prompt, 128 new tokens (4 requests, one after another)
  b  8 clients, prompts of 500-1000 tokens, 64 new (16 requests)
  c  32 clients, 128-token prompts, 64 new (64 requests)
  d  16 requests: a shared 500-token prefix and a short suffix of its own, 64 new; the first
     alone (it computes the prefix), then the other 15 from 15 clients, one every 0.5 s (each
     generates for seconds, so they overlap)
  s  32 clients ask for a 6-field JSON object (response_format json_schema), 100-token text and
     the request, up to 96 new (64 requests)
  u  the same requests as s without response_format, each capped at the tokens its s twin
     generated on the same server, so both do the same work: s/u tok/s (s_over_u) is the
     grammar's cost (run s first)

Interleaved: for each scenario kiln runs, then vLLM; each server is started fresh for the scenario
(so no prefix cache carries over) and stopped before the other starts, so never both compute at
once. Both get the same number of sequences in flight (--max-num-seqs, 32 by default: vLLM's
--max-num-seqs; kiln's --max-num-seqs, or for a kiln without that flag an artifact with that
max_batch); the rest queue. kiln --threads N, vLLM
VLLM_CPU_OMP_THREADS_BIND=0-(N-1).

Prompts are cut from offline text (the stdlib's pydoc_data.topics) to exact token lengths measured
with the checkpoint's tokenizer.json (the servers add no BOS for this tokenizer; vLLM's reported
prompt_tokens are checked against it). Neither server is told to ignore EOS (kiln cannot), so a
request may end early; tokens are counted from usage.completion_tokens (kiln's last chunk; vLLM's
usage chunk via stream_options.include_usage) and early ends are reported as "short".

Per server and scenario: TTFT p50/p99, inter-token latency p50/p99 (gaps between streamed chunks
that carry text, pooled over requests), aggregate generated tok/s (completion tokens of complete
responses over the scenario's wall time), failed or truncated responses (HTTP error, error event,
no finish_reason, no usage or no [DONE]), and kiln/vLLM ratios; for (d) also the first request's
TTFT against the median of the later ones. Table on stdout, JSON at --out with the machine.
All traffic is to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import (VLLM_VENV, KilnServer, PeerUnavailable, Server, VllmServer, ensure_vllm,  # noqa: E402
                   kiln_artifact_for, kiln_serve_options)
from serve_load import PromptSource, machine, run_scenario, stream_request  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


SCENARIOS = {
    "a": {"title": "1 client, 128-token prompt, 128 new", "clients": 1, "new": 128},
    "b": {"title": "8 clients, 500-1000-token prompts, 64 new", "clients": 8, "new": 64},
    "c": {"title": "32 clients, 128-token prompts, 64 new", "clients": 32, "new": 64},
    "d": {"title": "1, then 15 every 0.5 s; shared 500-token prefix", "clients": 16, "new": 64},
    "s": {"title": "32 clients, a 6-field JSON object by json_schema", "clients": 32, "new": 96},
    "u": {"title": "s's requests without response_format", "clients": 32, "new": 96},
}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "email", "member", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                         "email": {"type": "string"}, "member": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}}}
EXTRA = {"s": {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}}
ASK_JSON = ("\n\nFrom the text above, invent a person who could have written it and answer with a JSON object "
            "with the fields name, age, city, email, member and tags.\n")
D_INTERVAL_S = 0.5


def build_prompts(src: PromptSource, key: str) -> tuple[list[str], dict]:
    if key == "a":
        prompts = [src.take(128) for _ in range(4)]
    elif key == "b":
        lengths = [500 + round(i * 500 / 15) for i in range(16)]  # 500 .. 1000, evenly
        prompts = [src.take(n) for n in lengths]
    elif key == "c":
        prompts = [src.take(128) for _ in range(64)]
    elif key == "d":
        prompts, shared = src.shared_prefix(500, 16)
        return prompts, {"shared_prefix_tokens": shared, "prompt_tokens": [src.count(p) for p in prompts]}
    elif key in ("s", "u"):  # the same text for both (cut once, see all_prompts)
        prompts = [src.take(100) + ASK_JSON for _ in range(64)]
    else:
        raise ValueError(key)
    return prompts, {"prompt_tokens": [src.count(p) for p in prompts]}


def run_prompts(url: str, model: str, key: str, prompts: list[str], sc: dict, timeout_s: float,
                caps: list[int] | None = None) -> tuple[list[dict], float]:
    """A scenario's requests; (d): the first alone (it computes the shared prefix), then the
    others from as many clients, one every D_INTERVAL_S, overlapping as they generate. (A burst
    of all 15 at once is bounded by computing their 15 suffixes, ~half the first prompt's
    tokens here, whatever the cache does.)"""
    if key != "d":
        return run_scenario(url, model, prompts, sc["clients"], caps or sc["new"], timeout_s, extra=EXTRA.get(key))
    first, w1 = run_scenario(url, model, prompts[:1], 1, sc["new"], timeout_s)
    later, w2 = run_scenario(url, model, prompts[1:], sc["clients"] - 1, sc["new"], timeout_s, D_INTERVAL_S)
    return first + later, w1 + w2


def pct(xs: list[float], q: float) -> float | None:
    return round(1e3 * float(np.percentile(xs, q)), 1) if xs else None


def summarise(results: list[dict], wall: float, max_tokens: int, expected_prompt_tokens: list[int],
              scenario: str) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [g for r in ok for g in r["itl"]]
    seen = [(r.get("prompt_tokens"), n) for r, n in zip(results, expected_prompt_tokens) if r.get("prompt_tokens")]
    s = {"requests": len(results), "failed_or_truncated": len(results) - len(ok),
         "short": sum(1 for r in ok if r["tokens"] < max_tokens),
         "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
         "itl_p99_ms": pct(itl, 99), "tok_s": round(sum(r["tokens"] for r in ok) / wall, 2) if wall > 0 else None,
         "generated_tokens": sum(r["tokens"] for r in ok), "wall_s": round(wall, 2),
         "mean_completion_tokens": round(float(np.mean([r["tokens"] for r in ok])), 1) if ok else None,
         "decode_tok_s_p50": round(float(np.median(rates)), 2) if (rates := [
             (r["tokens"] - 1) / (r["end"] - r["first_at"]) for r in ok if r["tokens"] > 1 and r["first_at"]]) else None,
         "prompt_tokens_reported": len(seen), "prompt_tokens_mismatched": sum(1 for a, b in seen if a != b),
         "errors": sorted({r.get("error", "") for r in results if not r["ok"]})[:5]}
    if scenario == "s":  # every answer should be the object asked for
        s["json_valid"] = sum(1 for r in ok if _is_person(r.get("text", "")))
        s["valid_answers_per_s"] = round(s["json_valid"] / wall, 2) if wall > 0 else None
    if scenario == "d" and results[0]["ok"] and results[0]["ttft"] is not None:
        # the first request ran alone and computed the shared prefix; the others came after it
        later = [r["ttft"] for r in results[1:] if r["ok"] and r["ttft"] is not None]
        s["ttft_first_ms"] = round(1e3 * results[0]["ttft"], 1)
        s["ttft_later_median_ms"] = pct(later, 50)
        s["later_over_first"] = round(s["ttft_later_median_ms"] / s["ttft_first_ms"], 2) if later else None
    return s


def _is_person(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == set(PERSON["required"])


# ---------------------------------------------------------------- main

RATIO_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tok_s")


def ratios(k: dict, v: dict) -> dict:
    out = {}
    for key in RATIO_KEYS + ("ttft_first_ms", "ttft_later_median_ms"):
        a, b = k.get(key), v.get(key)
        if a is not None and b:
            out[key] = round(a / b, 2)
    return out


def warm_up(server: Server, src_prompt: str) -> None:
    """Two short unmeasured requests on a fresh server (first-call costs)."""
    with httpx.Client(base_url=server.url, timeout=300) as c:
        for _ in range(2):
            stream_request(c, server.model_name, src_prompt, 8, time.perf_counter() + 300)


def kiln_run_reference(artifact: Path, prompts: list[str], new: int, threads: int) -> dict:
    """`kiln run --json` on each prompt (no server running): medians of the engine's own
    prefill_ms and decode tok/s; the first run is a warm-up."""
    got = []
    for prompt in prompts[:1] + prompts:
        out = subprocess.run([sys.executable, "-m", "compiler.cli", "run", str(artifact), "--json", "--quiet", "--prompt", prompt,
                              "--max-new-tokens", str(new), "--threads", str(threads)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            return {"error": out.stderr.strip().splitlines()[-1:]}
        got.append(json.loads(out.stdout))
    got = got[1:]
    return {"prefill_ms": round(float(np.median([g["prefill_ms"] for g in got])), 1),
            "decode_tok_s": round(float(np.median([g["decode_tok_s"] for g in got])), 2), "runs": len(got)}


def print_table(report: dict) -> None:
    cols = ("reqs", "fail", "short", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "tok/s")
    print(f"\n{'scenario':50} {'server':7} " + " ".join(f"{c:>9}" for c in cols))
    print("-" * 132)
    for key, sc in report["scenarios"].items():
        for name in ("kiln", "vllm"):
            r = sc["results"].get(name)
            if r is None:
                continue
            if "skipped" in r:
                print(f"{key + ') ' + sc['title']:50} {name:7} skipped: {r['skipped'].splitlines()[0][:70]}")
                continue
            vals = (r["requests"], r["failed_or_truncated"], r["short"], r["ttft_p50_ms"], r["ttft_p99_ms"],
                    r["itl_p50_ms"], r["itl_p99_ms"], r["tok_s"])
            print(f"{key + ') ' + sc['title']:50} {name:7} " + " ".join(f"{v!s:>9}" for v in vals))
        rt = sc.get("ratio_kiln_over_vllm")
        if rt:
            vals = ("", "", "", *(rt.get(k, "") for k in RATIO_KEYS))
            print(f"{'':50} {'k/v':7} " + " ".join(f"{v!s:>9}" for v in vals))
        if sc.get("kiln_over_kiln_run"):
            run, r = sc["kiln_run"], sc["kiln_over_kiln_run"]
            print(f"{'':50} {'kiln':7} against `kiln run` (prefill {run['prefill_ms']} ms, decode {run['decode_tok_s']} tok/s): "
                  f"TTFT {r['ttft_p50_over_prefill']}x its prefill, decode {r['decode_tok_s']}x")
        for name in ("kiln", "vllm"):
            r = sc["results"].get(name) or {}
            if "ttft_first_ms" in r:
                print(f"{'':50} {name:7} TTFT first {r['ttft_first_ms']} ms, later median "
                      f"{r['ttft_later_median_ms']} ms ({r['later_over_first']}x)")
        if sc.get("s_over_u"):
            valid = {n: (sc["results"][n] or {}).get("json_valid") for n in sc["s_over_u"]}
            print(f"{'':50} {'s/u':7} tok/s constrained over unconstrained: {sc['s_over_u']}; valid JSON answers: {valid}")
    print("times in ms; k/v = kiln/vLLM (latency: <1 kiln faster; tok/s: >1 kiln faster)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default=str(ROOT / "artifacts" / "smollm2-135m"), help="kiln engine artifact")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m.yaml"),
                   help="to build an artifact with enough max_batch when --artifact has too few rows")
    p.add_argument("--hf-dir", default=None, help="the checkpoint for vLLM (default: the recipe's source)")
    p.add_argument("--scenarios", default="a,b,c,d")
    p.add_argument("--peer", choices=("vllm", "none"), default="vllm")
    p.add_argument("--no-install", action="store_true", help="do not run benchmarks/install_vllm.sh when missing")
    p.add_argument("--vllm-venv", default=str(VLLM_VENV))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences in flight on both servers")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="pass to both (kiln only if it lists the option); default: each server's own")
    p.add_argument("--kv-space-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--scenario-timeout", type=float, default=600, help="seconds per scenario and server")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds for a server to come up")
    p.add_argument("--note", default="", help="recorded in the JSON (e.g. what else used the CPU)")
    p.add_argument("--out", default=str(ROOT / "bench-results" / "bench-serve.json"))
    a = p.parse_args()

    keys = [k.strip() for k in a.scenarios.split(",") if k.strip()]
    bad = [k for k in keys if k not in SCENARIOS]
    if bad or not keys:
        p.error(f"--scenarios takes a comma list of {','.join(SCENARIOS)}; got {a.scenarios!r}")
    out_path = Path(a.out)
    log_dir = out_path.parent / "logs"
    recipe = Path(a.recipe)
    import yaml  # the recipe names the checkpoint vLLM loads
    recipe_doc = yaml.safe_load(recipe.read_text())
    hf_dir = Path(a.hf_dir) if a.hf_dir else ROOT / recipe_doc["source"]
    model_name = str(recipe_doc["name"])  # the served name on both servers (kiln --name, vLLM --served-model-name)

    # kiln: same sequences in flight as vLLM
    kiln_opts = kiln_serve_options()
    kiln_seqs_flag = "--max-num-seqs" in kiln_opts
    # kiln's CPU rows are not capped by max_batch; a kiln without --max-num-seqs needs the rows built in
    artifact = Path(a.artifact) if kiln_seqs_flag else kiln_artifact_for(Path(a.artifact), recipe, a.max_num_seqs, log_dir)
    kiln_extra = []
    if a.max_num_batched_tokens is not None and "--max-num-batched-tokens" in kiln_opts:
        kiln_extra = ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]
    max_clients = max(SCENARIOS[k]["clients"] for k in keys)
    kiln = KilnServer(artifact, a.threads, a.max_num_seqs if kiln_seqs_flag else None, 4 * max_clients, kiln_extra,
                      model_name=model_name, log_dir=log_dir, ready_timeout=a.ready_timeout)

    peer: VllmServer | None = None
    peer_skip = "not requested (--peer none)" if a.peer == "none" else None
    if a.peer == "vllm":
        try:
            ensure_vllm(Path(a.vllm_venv), not a.no_install, log_dir)
            vextra = [] if a.max_num_batched_tokens is None else ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]
            peer = VllmServer(Path(a.vllm_venv), hf_dir, a.threads, a.max_num_seqs, a.kv_space_gib, a.max_model_len,
                              vextra, model_name=model_name, log_dir=log_dir, ready_timeout=a.ready_timeout)
        except PeerUnavailable as e:
            peer_skip = str(e)
            print(f"vLLM rows skipped: {e}", file=sys.stderr)

    src = PromptSource(hf_dir / "tokenizer.json")
    warm_prompt = src.take(32)
    # every scenario's prompts are cut in a fixed order, so a scenario's text does not depend on --scenarios
    all_prompts = {key: build_prompts(src, key) for key in SCENARIOS if key != "u"}
    all_prompts["u"] = all_prompts["s"]
    report: dict = {
        "machine": machine(), "note": a.note, "dtype": "float32", "threads": a.threads,
        "max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens,
        "checkpoint": str(hf_dir.relative_to(ROOT) if hf_dir.is_relative_to(ROOT) else hf_dir),
        "kiln": {"artifact": str(artifact.relative_to(ROOT) if artifact.is_relative_to(ROOT) else artifact),
                 "max_num_seqs_flag": kiln_seqs_flag, **kiln.describe()},
        "vllm": peer.describe() if peer else {"skipped": peer_skip},
        "method": "per scenario: fresh kiln server, then fresh vLLM server, never both running; streaming "
                  "/v1/completions, temperature 0, no ignore_eos; tokens from usage.completion_tokens",
        "scenarios": {}}

    failed_kiln = 0
    s_tokens: dict[str, list[int]] = {}  # per server: what each request of s generated
    try:
        for key in keys:
            sc = SCENARIOS[key]
            prompts, pinfo = all_prompts[key]
            entry = {"title": sc["title"], "clients": sc["clients"], "requests": len(prompts),
                     "max_tokens": sc["new"], **pinfo, "results": {}}
            report["scenarios"][key] = entry
            if key == "a":  # the engine alone on the same prompts: (a)'s targets are against it
                entry["kiln_run"] = kiln_run_reference(artifact, prompts, sc["new"], a.threads)
            for name, server in (("kiln", kiln), ("vllm", peer)):
                if server is None:
                    if name == "vllm":
                        entry["results"][name] = {"skipped": peer_skip}
                    continue
                print(f"[{key}] {name}: starting", file=sys.stderr, flush=True)
                try:
                    server.start(key)
                except PeerUnavailable as e:
                    if name == "kiln":
                        raise
                    peer_skip, peer = str(e), None
                    entry["results"][name] = {"skipped": peer_skip}
                    print(f"vLLM rows skipped: {e}", file=sys.stderr)
                    continue
                try:
                    warm_up(server, warm_prompt)
                    load = os.getloadavg()
                    caps = s_tokens.get(name) if key == "u" else None  # u does the work s did on this server
                    results, wall = run_prompts(server.url, model_name, key, prompts, sc, a.scenario_timeout, caps)
                    if key == "s":
                        s_tokens[name] = [max(r.get("tokens") or sc["new"], 1) for r in results]
                    s = summarise(results, wall, sc["new"], pinfo["prompt_tokens"], key)
                    s["startup_s"] = round(server.startup_s or 0, 1)
                    s["loadavg_before"] = [round(x, 2) for x in load]
                    s["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
                finally:
                    server.stop()
                entry["results"][name] = s
                if name == "kiln":
                    failed_kiln += s["failed_or_truncated"]
                for err in s["errors"]:
                    print(f"[{key}] {name} failure: {err}", file=sys.stderr)
                print(f"[{key}] {name}: {s['requests']} requests, {s['failed_or_truncated']} failed, "
                      f"{s['tok_s']} tok/s, {s['wall_s']} s", file=sys.stderr, flush=True)
            k, v = entry["results"].get("kiln"), entry["results"].get("vllm")
            if key == "a" and k and "skipped" not in k and entry["kiln_run"].get("prefill_ms"):
                run = entry["kiln_run"]
                entry["kiln_over_kiln_run"] = {
                    "ttft_p50_over_prefill": round(k["ttft_p50_ms"] / run["prefill_ms"], 2),
                    "decode_tok_s": round(k["decode_tok_s_p50"] / run["decode_tok_s"], 2) if k["decode_tok_s_p50"] else None}
            if k and v and "skipped" not in v:
                entry["ratio_kiln_over_vllm"] = ratios(k, v)
            if key == "u" and "s" in report["scenarios"]:  # the grammar's cost, per server
                report["scenarios"]["s"]["s_over_u"] = {
                    n: round(r["tok_s"] / entry["results"][n]["tok_s"], 3)
                    for n, r in report["scenarios"]["s"]["results"].items()
                    if r.get("tok_s") and entry["results"].get(n, {}).get("tok_s")}
    finally:
        kiln.stop()
        if peer:
            peer.stop()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
    if report["vllm"].get("skipped") is None and peer_skip:
        report["vllm"]["skipped"] = peer_skip
        out_path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    if peer_skip:
        print(f"vLLM: skipped ({peer_skip.splitlines()[0]})")
    print(f"JSON: {out_path}")
    return 1 if failed_kiln else 0


if __name__ == "__main__":
    sys.exit(main())
