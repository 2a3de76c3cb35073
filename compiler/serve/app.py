"""kiln serve's OpenAI-compatible API.

Routes: /v1/completions and /v1/chat/completions (SSE or whole; structured outputs, tools,
logprobs, n: serve/generate.py) for decoder artifacts, /v1/embeddings for encoder artifacts,
/tokenize and /detokenize (vLLM's shapes), /v1/models, /health and /metrics.

Errors come in OpenAI's error object ({"error": {message, type, param, code}}): 400 for a bad
request, naming the field (an unknown field too: kiln refuses what it does not implement), 404
for a model name this server does not serve, 413 for a body over MAX_BODY, 429 when the queue is
full, 503 when the server is stopping or its engine worker has stopped (/health too). A request
whose client goes away is cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compiler.runtime.settings import RuntimeSettings
from compiler.runtime.tools import usable_format
from compiler.serve.api import ChatRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest
from compiler.serve.generate import Generations, checked_ids, chat_message
from compiler.serve.metrics import Metrics
from compiler.serve.reply import ApiError
from compiler.serve.worker import EngineWorker

MAX_BODY = 32 << 20  # bytes a request body may have
log = logging.getLogger("kiln.serve")


def create_app(engine, name: str, max_queue: int = 64, settings: RuntimeSettings | None = None) -> FastAPI:
    """engine: a decoder Engine (requests join the running batch as KV rows free up; settings: rows,
    the per-step token budget, the prefix cache, speculation) or an Encoder (embeddings)."""
    metrics = Metrics()
    generating = engine.config.task == "generate"
    batcher = EngineWorker(engine, max_queue, settings, metrics) if generating else None
    gen = Generations(engine, name, batcher, metrics, *usable_format(engine.text)) if generating else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if batcher is not None:
            batcher.close()  # later submissions get 503

    app = FastAPI(title="kiln serve", lifespan=lifespan)
    app.state.batcher = batcher

    def refuse(path: str, e: ApiError) -> JSONResponse:
        metrics.requests.labels(path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e["loc"] if x != "body")
        if e["type"] == "extra_forbidden":
            return refuse(request.url.path, ApiError(400, f"unsupported field {where}: kiln does not implement it; "
                                                          "remove it from the request", where, code="unsupported_field"))
        msg = e["msg"].removeprefix("Value error, ")
        return refuse(request.url.path, ApiError(400, f"invalid request: {where + ': ' if where else ''}{msg}", where or None))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return refuse(request.url.path, exc)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # logged with its traceback; the client gets the shape
        log.error("%s failed", request.url.path, exc_info=exc)
        return refuse(request.url.path, ApiError(500, f"internal error: {type(exc).__name__}: {exc}"[:500]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):  # unknown routes, methods, oversize bodies
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return refuse(request.url.path, ApiError(exc.status_code, str(exc.detail), code=code))

    app.add_middleware(BodyLimit, limit=MAX_BODY)

    def served(model: str | None, generates: bool) -> None:
        if model not in (None, name):
            raise ApiError(404, f"model {model!r} is not served here; this server serves {name!r} (see /v1/models)",
                           "model", code="model_not_found")
        if generates != generating:
            raise ApiError(400, f"{name} is {'a text generator' if generating else 'an embedding model'}; "
                                f"{'/v1/embeddings needs an encoder artifact' if generating else 'use /v1/embeddings'}",
                           "model", code="wrong_endpoint")

    @app.get("/health")
    def health():
        if batcher is not None and not batcher.alive:
            return JSONResponse({"status": "dead", "queue": batcher.depth,
                                 "detail": "the engine worker has stopped; restart the server"}, status_code=503)
        return {"status": "ok", "queue": batcher.depth if batcher else 0}

    @app.get("/metrics")
    def prometheus():
        if batcher is not None:
            metrics.queue.set(batcher.depth)
            metrics.engine_state(batcher.core)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "kiln",
                                            "max_model_len": engine.config.max_seq}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        served(req.model, True)
        return await gen.run(request, gen.completion_plan(req), "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        served(req.model, True)
        return await gen.run(request, gen.chat_plan(req), "/v1/chat/completions")

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        served(req.model, False)
        items = [req.input] if isinstance(req.input, str) or (req.input and isinstance(req.input[0], int)) else req.input
        if not items or any(not x for x in items):
            raise ApiError(400, "invalid request: input: an input is empty", "input")
        ids = [engine.text.encode(x) if isinstance(x, str) else checked_ids(x, engine.config.vocab_size, "input") for x in items]
        vectors = await asyncio.to_thread(engine.embed_ids, ids)  # [N, H]
        if req.dimensions not in (None, vectors.shape[1]):
            raise ApiError(400, f"invalid request: dimensions: this model's embeddings have {vectors.shape[1]} "
                                "dimensions and kiln does not shorten them; leave dimensions out", "dimensions")
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                 if req.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        n = sum(len(x) for x in ids)
        metrics.requests.labels("/v1/embeddings", "200").inc()
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest):
        served(req.model, generating)
        if req.messages is not None:
            try:
                tokens = engine.text.chat_ids([chat_message(m) for m in req.messages])
            except ValueError as e:
                raise ApiError(400, f"invalid request: messages: {e}", "messages") from None
        else:
            tokens = engine.text.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": engine.config.max_seq, "tokens": tokens}

    @app.post("/detokenize")
    def detokenize(req: DetokenizeRequest):
        served(req.model, generating)
        return {"prompt": engine.text.decode(checked_ids(req.tokens, engine.config.vocab_size, "tokens"))}

    return app


class BodyLimit:
    """Pure ASGI (a BaseHTTPMiddleware would hide client disconnects from the handlers): a body
    over `limit` bytes is refused with 413, by its Content-Length or, when chunked, once read."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length", b"")
        if size.isdigit() and int(size) > self.limit:  # answered here: the app's handlers are inside
            error = ApiError(413, self._why(int(size)), code="request_too_large")
            return await JSONResponse(error.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise StarletteHTTPException(413, self._why(seen))
            return message

        await self.app(scope, counted, send)

    def _why(self, size: int) -> str:
        return f"the request body has {size} bytes or more, over the limit of {self.limit}; send a smaller request"
