"""`make bench-serve`: kiln serve under 32 concurrent streaming clients for 60 s on loopback.

Starts `kiln serve` on the SmolLM2 artifact in its own process, measures one client alone, then
N clients each sending streaming completions back to back for the duration. Reports failed or
truncated responses (no finish_reason or no [DONE]), p50/p99 time to first token, and aggregate
generated tok/s against the single client's, as a table and bench-results/bench-serve.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a short note about rivers.", "Explain what a compiler does.", "List three colours and why they matter.",
           "Tell me about the moon."]


def one_request(client: httpx.Client, i: int, max_tokens: int) -> dict:
    t0, ttft, tokens, finish, done = time.perf_counter(), None, 0, None, False
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "stream": True}
    try:
        with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code}
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        return {"ok": False, "error": ev["error"].get("message", "")[:200]}
                    if ttft is None and ev["choices"][0].get("text"):
                        ttft = time.perf_counter() - t0
                    finish = ev["choices"][0].get("finish_reason") or finish
                    tokens = ev.get("usage", {}).get("completion_tokens", tokens)
    except httpx.HTTPError as e:
        return {"ok": False, "error": type(e).__name__}
    return {"ok": done and finish is not None, "ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - t0}


def clients(url: str, n: int, seconds: float, max_tokens: int) -> tuple[list[dict], float]:
    results, lock, stop_at = [], threading.Lock(), time.perf_counter() + seconds

    def loop(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            i = k
            while time.perf_counter() < stop_at:
                r = one_request(c, i, max_tokens)
                with lock:
                    results.append(r)
                i += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def summary(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    for r in results:
        if not r["ok"]:
            print("failed:", r, file=sys.stderr)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"requests": len(results), "failed_or_truncated": len(results) - len(ok),
            "ttft_p50_ms": round(1e3 * float(np.percentile(ttft, 50)), 1) if ttft else None,
            "ttft_p99_ms": round(1e3 * float(np.percentile(ttft, 99)), 1) if ttft else None,
            "tok_s": round(sum(r["tokens"] for r in ok) / wall, 1), "seconds": round(wall, 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--artifact", default=str(ROOT / "artifacts" / "smollm2-135m"))
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench-results" / "bench-serve.json"))
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "compiler.cli", "serve", a.artifact, "--port", str(port), "--quiet",
                               "--max-queue", str(4 * a.clients)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        single = summary(*clients(url, 1, min(20.0, a.seconds), a.max_tokens))
        many = summary(*clients(url, a.clients, a.seconds, a.max_tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = {"artifact": Path(a.artifact).name, "max_tokens": a.max_tokens, "single": single, f"{a.clients} clients": many,
              "aggregate_vs_single": round(many["tok_s"] / single["tok_s"], 2) if single["tok_s"] else None}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':12} {'requests':>9} {'failed':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'tok/s':>7}")
    for label, r in (("1 client", single), (f"{a.clients} clients", many)):
        print(f"{label:12} {r['requests']:>9} {r['failed_or_truncated']:>7} {r['ttft_p50_ms']!s:>9} {r['ttft_p99_ms']!s:>9} {r['tok_s']:>7}")
    print(f"aggregate tok/s vs one client: {report['aggregate_vs_single']}x")
    return 1 if many["failed_or_truncated"] else 0


if __name__ == "__main__":
    sys.exit(main())
