"""The OpenAI-compatible API: /v1/completions, /v1/chat/completions (SSE streaming or not),
/v1/models, /health and /metrics. Bad requests get 400 with the reason (the prompt is tokenized
and checked against max_seq here, once); a full queue 429; a stopping server, or one whose
engine worker has stopped, 503 (/health too). A request whose client goes away is cancelled."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compiler.runtime.engine import Engine, Generation, GenerationConfig
from compiler.runtime.settings import RuntimeSettings
from compiler.serve.jobs import Job, Overloaded, Unavailable
from compiler.serve.metrics import Metrics
from compiler.serve.reply import JobStream, Reply, failure
from compiler.serve.worker import EngineWorker


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int = Field(128, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported (one choice per request)")
        return n

    def config(self, chat: bool) -> GenerationConfig:
        return GenerationConfig.of(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                                   top_p=self.top_p, seed=self.seed, stop=self.stop, chat=chat)


class CompletionRequest(_Params):
    prompt: str = Field(min_length=1)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Params):
    messages: list[Message] = Field(min_length=1)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(engine: Engine, name: str, max_queue: int = 64, settings: RuntimeSettings | None = None) -> FastAPI:
    """Requests join the running batch as KV rows free up and are answered as they finish;
    settings: rows, the per-step token budget, the prefix cache, speculation (runtime/settings.py)."""
    metrics = Metrics()
    batcher = EngineWorker(engine, max_queue, settings, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()  # later submissions get 503

    app = FastAPI(title="kiln serve", lifespan=lifespan)
    app.state.batcher = batcher

    def refuse(endpoint: str, status: int, message: str, kind: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(status)).inc()
        return _error(status, message, kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e["loc"] if x != "body")
        return refuse(request.url.path, 400, f"invalid request: {where}: {e['msg']}", "invalid_request_error")

    @app.get("/health")
    def health():
        if not batcher.alive:
            return JSONResponse({"status": "dead", "queue": batcher.depth,
                                 "detail": "the engine worker has stopped; restart the server"}, status_code=503)
        return {"status": "ok", "queue": batcher.depth}

    @app.get("/metrics")
    def prometheus():
        metrics.queue.set(batcher.depth)
        metrics.engine_state(batcher.core)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "kiln"}]}

    async def run(request: Request, req: _Params, prompt: str | list[dict], chat: bool, endpoint: str) -> Response:
        t0 = time.perf_counter()
        try:
            ids = engine.text.prompt_ids(prompt, chat)
        except ValueError as e:
            return refuse(endpoint, 400, f"invalid request: {e}", "invalid_request_error")
        job = Job(ids, req.config(chat), asyncio.get_running_loop(), asyncio.Queue())
        try:
            batcher.core.validate(ids, job.config)  # length, settings, KV budget: a plain 400 before any stream
        except ValueError as e:
            return refuse(endpoint, 400, f"invalid request: {e}", "invalid_request_error")
        try:
            batcher.submit(job)
        except Overloaded:
            return refuse(endpoint, 429, "server busy: the request queue is full, retry later", "overloaded")
        except Unavailable as e:
            return refuse(endpoint, 503, str(e), "unavailable")
        reply = Reply(job, endpoint, metrics, t0)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return JobStream(_sse(reply, rid, chat), reply)
        try:
            return await _whole(request, reply, rid, chat)
        finally:
            reply.close()

    async def _whole(request: Request, reply: Reply, rid: str, chat: bool) -> Response:
        text, gen = "", None
        async for item in reply.items(request):
            if isinstance(item, Exception):
                status, kind = failure(item)
                return _error(status, str(item), kind)
            if isinstance(item, Generation):
                gen = item
            else:
                text += item
        if gen is None:  # the client has gone: nobody reads this
            return Response(status_code=499)
        choice = {"index": 0, "finish_reason": gen.finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        n_prompt = len(reply.job.ids)
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": name, "choices": [choice],
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(gen.token_ids),
                                       "total_tokens": n_prompt + len(gen.token_ids)}})

    async def _sse(reply: Reply, rid: str, chat: bool):
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
        async for item in reply.items():
            if isinstance(item, Exception):  # the stream has started: report in-band
                yield "data: " + json.dumps({"error": {"message": str(item), "type": failure(item)[1]}}) + "\n\n"
            elif isinstance(item, Generation):
                yield chunk(None, item.finish_reason, {"completion_tokens": len(item.token_ids)})
            else:
                yield chunk(item, None)
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await run(request, req, req.prompt, False, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        return await run(request, req, [m.model_dump() for m in req.messages], True, "/v1/chat/completions")

    return app
