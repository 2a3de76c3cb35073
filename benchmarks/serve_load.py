"""Load for `make bench-serve`: exact-length prompts from offline text, one streaming
/v1/completions request timed chunk by chunk, clients released together (or staggered) over a
prompt queue, and the machine's description for the report."""

from __future__ import annotations

import json
import os
import platform
import queue
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from tokenizers import Tokenizer


# ---------------------------------------------------------------- prompts from offline text

class PromptSource:
    """Exact-length prompts cut from pydoc_data.topics, each from text not used before."""

    def __init__(self, tokenizer_json: Path):
        from pydoc_data.topics import topics
        self.tok = Tokenizer.from_file(str(tokenizer_json))
        corpus = "\n\n".join(topics[k].strip() for k in sorted(topics))
        self.ids = self.tok.encode(corpus, add_special_tokens=False).ids
        self.cursor = 0

    def count(self, text: str) -> int:
        return len(self.tok.encode(text).ids)  # as a server counts a completion prompt

    def take(self, n: int) -> str:
        """A text of exactly n tokens from the next unused stretch of the corpus."""
        for shift in range(64):
            start = self.cursor + shift
            m = n
            for _ in range(8):
                if start + m > len(self.ids) or m <= 0:
                    break
                text = self.tok.decode(self.ids[start:start + m])
                got = self.count(text)
                if got == n and text.strip():
                    self.cursor = start + m
                    return text
                m += n - got
        raise RuntimeError(f"no {n}-token prompt found near corpus token {self.cursor} of {len(self.ids)}")

    def shared_prefix(self, prefix_tokens: int, k: int, suffix_tokens: int = 12) -> tuple[list[str], int]:
        """k prompts: one prefix of prefix_tokens, then "\\n\\n" and a different short text each.
        Returns them and the number of leading tokens all their encodings share."""
        prefix = self.take(prefix_tokens)
        pre_ids = self.tok.encode(prefix).ids
        prompts = []
        for _ in range(k):
            for _attempt in range(16):
                p = prefix + "\n\n" + self.take(suffix_tokens)
                if self.tok.encode(p).ids[:prefix_tokens] == pre_ids:
                    prompts.append(p)
                    break
            else:
                raise RuntimeError("could not keep the shared prefix's tokens intact after a suffix")
        encs = [self.tok.encode(p).ids for p in prompts]
        shared = 0
        while all(len(e) > shared for e in encs) and len({e[shared] for e in encs}) == 1:
            shared += 1
        return prompts, shared




# ---------------------------------------------------------------- one streaming request

def stream_request(client: httpx.Client, model: str, prompt: str, max_tokens: int, deadline: float,
                   extra: dict | None = None) -> dict:
    """extra: more body fields (a scenario's response_format)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    times: list[float] = []
    pieces: list[str] = []
    finish, usage, done = None, None, False
    try:
        with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {r.read()[:200]!r}"}
            for line in r.iter_lines():
                now = time.perf_counter()
                if now > deadline:
                    return {"ok": False, "error": "scenario deadline passed mid-stream"}
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                ev = json.loads(line[6:])
                if "error" in ev:
                    return {"ok": False, "error": str(ev["error"])[:200]}
                for ch in ev.get("choices") or []:
                    if ch.get("text"):
                        times.append(now)
                        pieces.append(ch["text"])
                    finish = ch.get("finish_reason") or finish
                if ev.get("usage"):
                    usage = ev["usage"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    t1 = time.perf_counter()
    ok = done and finish is not None and usage is not None and usage.get("completion_tokens") is not None
    out = {"ok": ok, "start": t0, "end": t1, "finish": finish, "tokens": (usage or {}).get("completion_tokens", 0),
           "prompt_tokens": (usage or {}).get("prompt_tokens"),
           "ttft": times[0] - t0 if times else None, "first_at": times[0] if times else None,
           "itl": np.diff(times).tolist() if len(times) > 1 else [], "text": "".join(pieces)}
    if not ok:
        out["error"] = "truncated: " + ", ".join(n for n, v in (("no [DONE]", done), ("no finish_reason", finish),
                                                               ("no usage", usage)) if not v)
    return out


def run_scenario(url: str, model: str, prompts: list[str], clients: int, max_tokens: int | list[int],
                 timeout_s: float, stagger_s: float = 0.0, extra: dict | None = None) -> tuple[list[dict], float]:
    """`clients` threads take the prompts in order from one queue, released together (client i
    starts i * stagger_s later); after timeout_s nothing more is sent and streams still open are
    cut (counted as failed)."""
    work: queue.Queue = queue.Queue()
    for i, p in enumerate(prompts):
        work.put((i, p))
    results: list[dict | None] = [None] * len(prompts)
    clock: dict[str, float] = {}
    barrier = threading.Barrier(clients, action=lambda: clock.setdefault("t0", time.perf_counter()))
    deadline_box: dict[str, float] = {}

    def client_loop(index: int) -> None:
        timeout = httpx.Timeout(connect=10.0, read=min(300.0, timeout_s), write=30.0, pool=30.0)
        with httpx.Client(base_url=url, timeout=timeout) as c:
            barrier.wait()
            time.sleep(index * stagger_s)
            deadline = deadline_box.setdefault("deadline", clock["t0"] + timeout_s)
            while time.perf_counter() < deadline:
                try:
                    i, p = work.get_nowait()
                except queue.Empty:
                    return
                cap = max_tokens[i] if isinstance(max_tokens, list) else max_tokens  # a cap per prompt, or one
                results[i] = stream_request(c, model, p, cap, deadline, extra)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 360)  # a stream is cut at the deadline or by its read timeout
    out = [r if r is not None else {"ok": False, "error": "not sent before the scenario deadline"} for r in results]
    ends = [r["end"] for r in out if "end" in r]
    wall = (max(ends) if ends else time.perf_counter()) - clock.get("t0", time.perf_counter())
    return out, wall


# ---------------------------------------------------------------- machine

def machine() -> dict:
    info: dict = {"platform": platform.platform(), "logical_cpus": os.cpu_count(),
                  "affinity_cpus": len(os.sched_getaffinity(0))}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    blocks = [b for b in text.split("\n\n") if b.strip()]
    fields = [dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in b.splitlines())) for b in blocks]
    if fields:
        f0 = fields[0]
        flags = set(f0.get("flags", "").split())
        info["cpu_model"] = f0.get("model name")
        info["physical_cores"] = len({(f.get("physical id"), f.get("core id")) for f in fields}) or None
        info["isa"] = {k: k in flags for k in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                                                 "amx_int8")}
    try:
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        info["mem_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info
