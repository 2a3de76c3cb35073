"""The OpenAI-compatible API: /v1/completions, /v1/chat/completions (SSE streaming or not),
/v1/models, /health and /metrics. Bad requests get 400 with the reason; a full queue 429; a
stopping server 503."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from compiler.runtime.engine import Engine, Generation, GenerationConfig
from compiler.serve.batcher import Batcher, Job, Overloaded, ShuttingDown
from compiler.serve.scheduler import Scheduler
from compiler.serve.metrics import Metrics


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int = Field(128, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False

    def config(self, chat: bool) -> GenerationConfig:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationConfig(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, seed=self.seed, stop=stop, chat=chat)


class CompletionRequest(_Params):
    prompt: str = Field(min_length=1)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Params):
    messages: list[Message] = Field(min_length=1)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(engine: Engine, name: str, max_queue: int = 64, batching: str = "inflight") -> FastAPI:
    """batching: "inflight" (requests join a running batch, answered as they finish) or
    "static" (waiting requests with the same settings form whole batches)."""
    batcher = Scheduler(engine, max_queue) if batching == "inflight" else Batcher(engine, max_queue)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()  # later submissions get 503

    app = FastAPI(title="kiln serve", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e["loc"] if x != "body")
        metrics.requests.labels(request.url.path, "400").inc()
        return _error(400, f"invalid request: {where}: {e['msg']}", "invalid_request_error")

    @app.get("/health")
    def health():
        return {"status": "ok", "queue": batcher.depth}

    @app.get("/metrics")
    def prometheus():
        metrics.queue.set(batcher.depth)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "kiln"}]}

    async def run(req: _Params, prompt, chat: bool, endpoint: str):
        t0, loop = time.perf_counter(), asyncio.get_running_loop()
        job = Job(prompt, req.config(chat), loop, asyncio.Queue())
        try:
            batcher.submit(job)
        except Overloaded:
            metrics.requests.labels(endpoint, "429").inc()
            return _error(429, "server busy: the request queue is full, retry later", "overloaded")
        except ShuttingDown:
            metrics.requests.labels(endpoint, "503").inc()
            return _error(503, "server is shutting down", "unavailable")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_sse(job, rid, chat, endpoint, t0), media_type="text/event-stream")
        return await _whole(job, rid, chat, endpoint, t0)

    async def _pieces(job: Job, endpoint: str, t0: float):
        first = True
        while True:
            item = await job.out.get()
            if isinstance(item, Exception):
                metrics.requests.labels(endpoint, "500").inc()
                raise item
            if isinstance(item, Generation):
                metrics.tokens.inc(len(item.token_ids))
                metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
                metrics.requests.labels(endpoint, "200").inc()
                yield item
                return
            if first:
                metrics.ttft.observe(time.perf_counter() - t0)
                first = False
            yield item

    async def _whole(job, rid, chat, endpoint, t0):
        text, gen = "", None
        async for item in _pieces(job, endpoint, t0):
            if isinstance(item, Generation):
                gen = item
            else:
                text += item
        choice = {"index": 0, "finish_reason": gen.finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        n_prompt = len(engine.text.prompt_ids(job.prompt, chat))
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": name, "choices": [choice],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(gen.token_ids),
                          "total_tokens": n_prompt + len(gen.token_ids)}}

    async def _sse(job, rid, chat, endpoint, t0):
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(piece: str | None, finish: str | None, usage: dict | None = None) -> str:
            if chat:
                choice = {"index": 0, "delta": {} if piece is None else {"content": piece}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish}
            body = {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice]}
            if usage:  # the last chunk carries the token count (OpenAI's include_usage, always on)
                body["usage"] = usage
            return "data: " + json.dumps(body) + "\n\n"

        if chat:
            yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name, "choices": [
                {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}) + "\n\n"
        try:
            async for item in _pieces(job, endpoint, t0):
                if isinstance(item, Generation):
                    yield chunk(None, item.finish_reason, {"completion_tokens": len(item.token_ids)})
                else:
                    yield chunk(item, None)
        except Exception as e:  # noqa: BLE001  (the stream has started: report in-band)
            yield "data: " + json.dumps({"error": {"message": str(e), "type": "server_error"}}) + "\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await run(req, req.prompt, False, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await run(req, [m.model_dump() for m in req.messages], True, "/v1/chat/completions")

    return app
