"""The server's worker under failure: a request that fails does not stop it, a worker that stops
anyway shows in /health and answers every request (so the server still shuts down), and a client
that goes away has its request cancelled and its slot freed."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from compiler.runtime import load
from compiler.runtime.settings import RuntimeSettings
from compiler.runtime.engine import Generation, GenerationConfig
from compiler.serve.jobs import Job
from compiler.serve.worker import EngineWorker
from tests.serve.loopback import Gate, Server, post_raw, read_until, sse, wait_for

LONG = "The river"  # the tiny model runs 200 tokens on it without meeting its eos token
MAX_TOKENS = 200


async def _outcome(job: Job) -> Generation | Exception:
    while True:
        item = await asyncio.wait_for(job.out.get(), timeout=60)
        if isinstance(item, (Generation, Exception)):
            return item


def test_a_failing_request_gets_its_error_and_the_worker_goes_on(tiny_artifacts):
    engine = load(tiny_artifacts[("llama", "contrib")])
    worker = EngineWorker(engine)
    step, failed = engine.session.step, []

    def step_failing_once(*args, **kwargs):
        if failed == ["admission"]:
            failed.append("step")
            raise RuntimeError("step failed")
        return step(*args, **kwargs)

    engine.session.step = step_failing_once

    async def main() -> list:
        loop = asyncio.get_running_loop()

        def submit(seed: int) -> Job:
            job = Job(engine.text.prompt_ids("Hi", False), GenerationConfig(max_new_tokens=4, seed=seed), loop, asyncio.Queue())
            worker.submit(job)
            return job

        # seed -1 is refused over HTTP now; a request that fails in admission must not stop the worker
        bad, good = submit(-1), submit(1)
        outcomes = [await _outcome(bad), await _outcome(good)]
        failed.append("admission")
        outcomes.append(await _outcome(submit(2)))  # its step fails
        outcomes.append(await _outcome(submit(3)))
        return outcomes

    try:
        bad, good, stepped, after = asyncio.run(main())
        assert isinstance(bad, ValueError) and isinstance(good, Generation) and good.token_ids
        assert isinstance(stepped, RuntimeError) and str(stepped) == "step failed"
        assert isinstance(after, Generation) and after.token_ids and worker.alive
    finally:
        worker.close()
    assert not worker.alive


class _Crash(BaseException):
    """Not an Exception: gets past the loops' per-request handlers and ends the worker thread."""


def test_a_dead_worker_shows_in_health_answers_requests_and_the_server_stops(tiny_artifacts):
    s = Server(tiny_artifacts[("llama", "contrib")])

    def crash(*args, **kwargs):
        raise _Crash()

    s.engine.session.step = crash
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            _, events = sse(c, "/v1/completions", {"prompt": "Hi", "max_tokens": 4})  # in flight when it dies
            assert events[-2]["error"]["type"] == "unavailable" and events[-1] == {"done": True}
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "dead"
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            assert r.status_code == 503 and "worker has stopped" in r.json()["error"]["message"]
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "stream": True})
            assert r.status_code == 503
    finally:
        s.stop()
    assert not s.thread.is_alive()


def _cancelled(c: httpx.Client) -> float:
    m = re.search(r'^kiln_requests_cancelled_total\{endpoint="/v1/completions"\} (\S+)$', c.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def _steps_to_finish(s: Server, c: httpx.Client, gate: Gate) -> int:
    """Release the engine; the forward steps run until a short request is answered."""
    before = gate.steps
    gate.release()
    r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 200, r.text
    wait_for(lambda: s.batcher.depth == 0 and not s.batcher.running, "the worker to go idle")
    return gate.steps - before


def test_clients_that_hang_up_are_cancelled_and_free_the_engine(tiny_artifacts):
    """Two streams and two plain requests (as many as the engine's rows) hang up while the engine
    is held: each is cancelled and counted, and the engine does not generate their 200 tokens."""
    s = Server(tiny_artifacts[("llama", "contrib")])
    assert s.engine.generate(LONG, max_new_tokens=MAX_TOKENS).finish_reason == "length"
    gate = Gate(s.engine.session, budget=0)
    try:
        with s.submissions() as jobs, httpx.Client(base_url=s.url, timeout=60) as c:
            socks = [post_raw(s.port, "/v1/completions", {"prompt": LONG, "max_tokens": MAX_TOKENS, "stream": i % 2 == 0})
                     for i in range(4)]
            wait_for(lambda: len(jobs) == 4, "the requests to be submitted")
            for sock in socks:
                sock.close()
            wait_for(lambda: _cancelled(c) == 4, "4 cancelled requests in /metrics")
            assert all(job.cancelled for job in jobs)
            assert _steps_to_finish(s, c, gate) < 20  # running the dropped requests would take 200
    finally:
        gate.release()
        s.stop()


def test_streams_dropped_mid_stream_free_their_slots(tiny_artifacts):
    """Four streams fill the in-flight batch and hang up after their first tokens: the slots are
    freed at the next step, so a new request is answered without waiting for 4 x 200 tokens."""
    s = Server(tiny_artifacts[("llama", "contrib")], settings=RuntimeSettings(max_num_seqs=4))
    gate = Gate(s.engine.session, budget=0)
    try:
        with s.submissions() as jobs, httpx.Client(base_url=s.url, timeout=60) as c:
            socks = [post_raw(s.port, "/v1/completions", {"prompt": LONG, "max_tokens": MAX_TOKENS, "stream": True})
                     for _ in range(4)]
            wait_for(lambda: len(jobs) == 4, "the requests to be submitted")
            gate.allow(40)  # enough for every stream's first tokens, far from 200
            for sock in socks:
                read_until(sock, b"data: {")
            wait_for(gate.waiting, "the engine to use its step budget")
            assert s.batcher.running == 4 and s.batcher.core.kv.free_rows == 0  # all four are still generating
            for sock in socks:
                sock.close()
            wait_for(lambda: _cancelled(c) == 4, "4 cancelled requests in /metrics")
            assert _steps_to_finish(s, c, gate) < 20
    finally:
        gate.release()
        s.stop()
