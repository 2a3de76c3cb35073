"""A request's side of its job: the job's output read into the metrics, and the job cancelled when
the client goes away first.

A non-streaming request watches for its client's disconnect while it waits. A streaming one is
closed by Starlette when its client disconnects (Starlette cancels the response on the ASGI
2.3 `http.disconnect`, or the response fails on send under ASGI 2.4); JobStream then cancels
the job. Either way the worker drops the job at its next step, and /metrics counts it in
kiln_requests_cancelled_total.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncGenerator, AsyncIterator

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from compiler.runtime.engine import Generation
from compiler.serve.jobs import Job, Piece, Unavailable
from compiler.serve.metrics import Metrics

POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class ApiError(Exception):
    """A request answered with an error in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def failure(e: Exception) -> tuple[int, str]:
    """HTTP status and error type for an exception a job ended with."""
    if isinstance(e, Unavailable):
        return 503, "unavailable"
    if isinstance(e, ValueError):
        return 400, "invalid_request_error"
    return 500, "server_error"


class Reply:
    """The jobs of one request (one per choice: `n`, and each prompt of a completions batch),
    read together; items come tagged with their job's index."""

    def __init__(self, jobs: list[Job], endpoint: str, metrics: Metrics, t0: float):
        self.jobs, self.endpoint, self.metrics, self.t0 = jobs, endpoint, metrics, t0
        self.open = set(range(len(jobs)))  # jobs that have not answered (a Generation or an Exception)
        self.error: Exception | None = None  # the first a job answered with

    @property
    def done(self) -> bool:
        return not self.open

    async def items(self, request: Request | None = None) -> AsyncIterator[tuple[int, Piece | Generation | Exception]]:
        """(job index, item): Pieces, then each job's Generation or Exception. With `request`, it
        ends early when that client disconnects."""
        first, gets = True, {}
        try:
            while self.open:
                for i in self.open - gets.keys():
                    gets[i] = asyncio.ensure_future(self.jobs[i].out.get())
                done, _ = await asyncio.wait(gets.values(), timeout=POLL_S if request else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if await request.is_disconnected():
                        return
                    continue
                for i in sorted(i for i, g in gets.items() if g in done):
                    item = gets.pop(i).result()
                    if isinstance(item, (Generation, Exception)):
                        self.open.discard(i)
                        self._count(item)
                    elif first:
                        self.metrics.ttft.observe(time.perf_counter() - self.t0)
                        first = False
                    yield i, item
        finally:
            for g in gets.values():
                g.cancel()  # a no-op once done; the queue keeps an item a cancelled get() did not take

    def _count(self, item: Generation | Exception) -> None:
        if isinstance(item, Generation):
            self.metrics.tokens.inc(len(item.token_ids))
        else:
            self.error = self.error or item
        if self.open:
            return
        self.metrics.latency.labels(self.endpoint).observe(time.perf_counter() - self.t0)
        self.metrics.requests.labels(self.endpoint, "200" if self.error is None else str(failure(self.error)[0])).inc()

    def close(self) -> None:
        """The request is over: jobs that have not answered are cancelled, and counted once."""
        if self.open:
            self.open = set()
            for job in self.jobs:
                job.cancel()
            self.metrics.cancelled.labels(self.endpoint).inc()


class JobStream(StreamingResponse):
    """Server-sent events from a job's Reply; the job is cancelled if the response ends early."""

    def __init__(self, content: AsyncGenerator[str, None], reply: Reply):
        super().__init__(content, media_type="text/event-stream")
        self.events, self.reply = content, reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reply.close()
            await self.events.aclose()  # run the generator's own cleanup now, not at GC
