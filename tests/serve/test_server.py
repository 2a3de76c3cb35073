"""kiln serve on loopback: the real uvicorn server in a thread, driven over HTTP with httpx."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from compiler.runtime import load
from compiler.serve.app import create_app

PROMPTS = ["The river", "Once upon a time", "In the beginning the", "Numbers like 42"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact, max_queue: int = 64, batching: str = "inflight"):
        self.engine = load(artifact)
        self.port = _free_port()
        app = create_app(self.engine, "tiny", max_queue, batching)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
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


@pytest.fixture(scope="module", params=["inflight", "static"])
def server(tiny_artifacts, request):
    s = Server(tiny_artifacts[("llama", "contrib")], batching=request.param)
    yield s
    s.stop()


def _sse(client: httpx.Client, url: str, body: dict) -> tuple[str, list[dict]]:
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
            choice = ev["choices"][0]
            text += choice.get("delta", {}).get("content", "") if "delta" in choice else choice["text"]
    return text, events


def test_health_models_and_metrics(server):
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
        c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        body = c.get("/metrics").text
    assert 'kiln_requests_total{endpoint="/v1/completions",status="200"}' in body
    assert "kiln_time_to_first_token_seconds_bucket" in body and "kiln_generated_tokens_total" in body


def test_completion_matches_the_runtime(server):
    want = server.engine.generate(PROMPTS[0], max_new_tokens=12, stop_token_ids=())
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 12}).json()
        streamed, events = _sse(c, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 12})
    assert r["choices"][0]["text"] == streamed
    assert r["usage"]["completion_tokens"] <= 12 and events[-1] == {"done": True}
    if want.finish_reason == "length":
        assert r["choices"][0]["text"] == want.text


def test_chat_streaming_equals_non_streaming(server):
    body = {"messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 10}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        whole = c.post("/v1/chat/completions", json=body).json()
        streamed, events = _sse(c, "/v1/chat/completions", body)
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["content"] == streamed
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}


@pytest.mark.parametrize("body,needle", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
])
def test_bad_requests_get_400_with_the_reason(server, body, needle):
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"]


def test_concurrent_streams_are_batched_and_complete(server):
    """8 clients at once, arriving a little apart (so in-flight batching mixes prefill and decode):
    every stream ends with [DONE] and carries what a lone request gets."""
    solo = {p: server.engine.generate(p, max_new_tokens=16).text for p in PROMPTS}

    def client(i_p):
        time.sleep(0.01 * i_p[0])
        return i_p[1], _sse(c, "/v1/completions", {"prompt": i_p[1], "max_tokens": 16})

    with httpx.Client(base_url=server.url, timeout=120) as c, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, enumerate(PROMPTS * 2)))
    for prompt, (text, events) in results:
        assert events[-1] == {"done": True} and text == solo[prompt]


@pytest.mark.parametrize("batching", ["inflight", "static"])
def test_full_queue_answers_429_not_a_crash(tiny_artifacts, batching):
    s = Server(tiny_artifacts[("llama", "contrib")], max_queue=1, batching=batching)
    try:
        with httpx.Client(base_url=s.url, timeout=120) as c, ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda _: c.post("/v1/completions", json={"prompt": "Long story", "max_tokens": 48}).status_code,
                                  range(16)))
            assert c.get("/health").status_code == 200
    finally:
        s.stop()
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes


def test_prompt_fed_token_by_token_survives_the_batch_draining(tiny_artifacts):
    """A long prompt arrives while a short request decodes, so it is fed a token a step; the
    short request ends (40 tokens) before the prompt is in (~100 tokens). The rest of the
    prompt must still go in one token at a time: the fused attention takes several new tokens
    only without past context."""
    from tests.conftest import english_text

    s = Server(tiny_artifacts[("llama", "contrib")])
    long_prompt = english_text()[3000:3400]
    try:
        want = s.engine.generate(long_prompt, max_new_tokens=8).text
        assert len(s.engine.text.encode(long_prompt)) > 60
        with httpx.Client(base_url=s.url, timeout=120) as c, ThreadPoolExecutor(1) as pool:
            long = None
            body = {"prompt": "Hi", "max_tokens": 40, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if long is None and line.startswith("data: {"):  # the short one is decoding now
                        long = pool.submit(c.post, "/v1/completions", json={"prompt": long_prompt, "max_tokens": 8})
            r = long.result()
    finally:
        s.stop()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
