"""Test helpers: kiln serve on loopback (the real uvicorn server in a thread), an SSE reader, a raw
socket client that can hang up mid-request, and a gate on the engine's forward step."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import uvicorn

from compiler.runtime import load
from compiler.runtime.settings import RuntimeSettings
from compiler.serve.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact, max_queue: int = 64, settings: RuntimeSettings | None = None):
        self.engine = load(artifact)
        self.port = free_port()
        self.app = create_app(self.engine, "tiny", max_queue, settings)
        self.batcher = self.app.state.batcher
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @contextmanager
    def submissions(self) -> Iterator[list]:
        """The jobs the HTTP side hands the worker inside the block."""
        jobs, submit = [], self.batcher.submit

        def recording(job):
            submit(job)
            jobs.append(job)

        self.batcher.submit = recording
        try:
            yield jobs
        finally:
            del self.batcher.submit


def sse(client: httpx.Client, url: str, body: dict) -> tuple[str, list[dict]]:
    text, events = "", []
    with client.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                events.append({"done": True})
                continue
            ev = json.loads(line[6:])
            events.append(ev)
            if "error" in ev:  # reported in-band once the stream has started
                continue
            choice = ev["choices"][0]
            text += choice.get("delta", {}).get("content", "") if "delta" in choice else choice["text"]
    return text, events


def post_raw(port: int, path: str, body: dict) -> socket.socket:
    """Send a POST on a plain socket and return the socket (read it, or close it to hang up)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def read_until(s: socket.socket, marker: bytes) -> bytes:
    buf = b""
    while marker not in buf:
        chunk = s.recv(65536)
        assert chunk, f"the server closed the connection before {marker!r}: {buf!r}"
        buf += chunk
    return buf


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    """Poll check() until it is true (a bounded wait for liveness, not a speed check)."""
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Gate:
    """Wraps an engine's forward step: counts the steps and lets only `budget` of them start
    (None: all); a step past the budget waits for allow() or release()."""

    def __init__(self, session, budget: int | None = None):
        self.inner, self.budget, self.steps = session.step, budget, 0
        self.cond = threading.Condition()
        session.step = self

    def __call__(self, *args, **kwargs):
        with self.cond:
            self.cond.wait_for(lambda: self.budget is None or self.steps < self.budget, timeout=120)
            self.steps += 1
        return self.inner(*args, **kwargs)

    def waiting(self) -> bool:
        with self.cond:
            return self.budget is not None and self.steps >= self.budget

    def allow(self, budget: int | None) -> None:
        """Let `budget` steps in all have started (None: no limit)."""
        with self.cond:
            self.budget = budget
            self.cond.notify_all()

    def release(self) -> None:
        self.allow(None)
