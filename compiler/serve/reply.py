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
from compiler.serve.jobs import Job, Unavailable
from compiler.serve.metrics import Metrics

POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


def failure(e: Exception) -> tuple[int, str]:
    """HTTP status and error type for an exception a job ended with."""
    if isinstance(e, Unavailable):
        return 503, "unavailable"
    if isinstance(e, ValueError):
        return 400, "invalid_request_error"
    return 500, "server_error"


class Reply:
    def __init__(self, job: Job, endpoint: str, metrics: Metrics, t0: float):
        self.job, self.endpoint, self.metrics, self.t0 = job, endpoint, metrics, t0
        self.done = False  # the job has answered (a Generation or an Exception), or was cancelled

    async def items(self, request: Request | None = None) -> AsyncIterator[str | Generation | Exception]:
        """Text pieces, then the Generation or an Exception. With `request`, it ends early, with
        neither, when that client disconnects."""
        first = True
        while not self.done:
            item = await self._next(request)
            if item is None:
                return
            if isinstance(item, Generation):
                self.done = True
                self.metrics.tokens.inc(len(item.token_ids))
                self.metrics.latency.labels(self.endpoint).observe(time.perf_counter() - self.t0)
                self.metrics.requests.labels(self.endpoint, "200").inc()
            elif isinstance(item, Exception):
                self.done = True
                self.metrics.requests.labels(self.endpoint, str(failure(item)[0])).inc()
            elif first:
                self.metrics.ttft.observe(time.perf_counter() - self.t0)
                first = False
            yield item

    async def _next(self, request: Request | None) -> str | Generation | Exception | None:
        """The job's next item; None if `request`'s client disconnects first."""
        if request is None:
            return await self.job.out.get()
        get = asyncio.ensure_future(self.job.out.get())
        try:
            while True:
                await asyncio.wait({get}, timeout=POLL_S)
                if get.done():
                    return get.result()
                if await request.is_disconnected():
                    return None
        finally:
            get.cancel()  # a no-op once done; the queue keeps an item a cancelled get() did not take

    def close(self) -> None:
        """The request is over: a job that has not answered is cancelled, and counted."""
        if not self.done:
            self.done = True
            self.job.cancel()
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
