"""What the HTTP side hands the engine: a Job (prompt ids, settings, a reply queue, a cancel
flag), and the Worker base of the server's engine worker (serve/worker.py).

A Worker owns a bounded queue and one thread. The thread never dies of a request: the loops
report a failing request's exception to that request and go on. If the thread ends anyway (a
bug, or close()), submissions are refused with 503 and every job still waiting or running is
answered, so no client waits forever and the server can still shut down; `alive` says so for
/health. A job whose client has gone is cancelled: the loops drop it at their next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from compiler.runtime.engine import Engine, GenerationConfig
from compiler.runtime.logprobs import TokenLogprob

log = logging.getLogger("kiln.serve")

SHUTTING_DOWN = "server is shutting down"
DEAD = "the engine worker has stopped (see the server log); restart the server"


class Overloaded(Exception):
    """The queue is full (429)."""


class Unavailable(Exception):
    """The server takes no requests (503): it is stopping, or its worker has stopped."""


@dataclass(frozen=True)
class Piece:
    """Text that became final in a step, and the logprobs of the tokens the step added (when asked)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Job:
    ids: list[int]  # the prompt's token ids (checked against max_seq by the HTTP handler)
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # Pieces, then a Generation (done) or an Exception
    enqueued: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client has gone: the worker stops generating for this job at its next step."""
        self._cancelled.set()

    def send(self, item: object) -> None:
        """Hand a Piece, the Generation or an Exception to the request (from any thread)."""
        if self.cancelled:
            return
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the server's event loop is closed: nobody is waiting any more
            pass


class Worker:
    """A bounded job queue and the thread that runs `_loop()` until close(). Subclasses set their
    own state before calling Worker.__init__, which starts the thread."""

    def __init__(self, engine: Engine, max_queue: int, name: str):
        self.engine = engine
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # orders submit() against the worker's end
        self._refusal: str | None = None  # why submissions are refused, once they are
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._refusal is not None:
                raise Unavailable(self._refusal)
            try:
                self.jobs.put_nowait(job)
            except queue.Full:
                raise Overloaded() from None

    def close(self) -> None:
        with self._lock:
            self._refusal = self._refusal or SHUTTING_DOWN
        self._stop.set()
        self.thread.join(timeout=5)

    # -- for subclasses ----------------------------------------------------------------------
    def _loop(self) -> None:
        raise NotImplementedError

    def _in_flight(self) -> list[Job]:
        """Jobs taken from the queue and not answered yet."""
        raise NotImplementedError

    def _take(self, block: bool) -> Job | None:
        """The next job that is not cancelled, or None when the queue is empty (after a short
        wait when block)."""
        while True:
            try:
                job = self.jobs.get(timeout=0.1) if block else self.jobs.get_nowait()
            except queue.Empty:
                return None
            if not job.cancelled:
                return job

    # -- the thread ------------------------------------------------------------------------------
    def _main(self) -> None:
        reason = SHUTTING_DOWN
        try:
            self._loop()
        except BaseException:  # noqa: BLE001  (logged; requests are answered and /health says dead)
            log.exception("the engine worker stopped")
            reason = DEAD
        with self._lock:
            if reason == DEAD or self._refusal is None:
                self._refusal = reason
        waiting = self._in_flight()
        while True:
            try:
                waiting.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        for job in waiting:
            job.send(Unavailable(reason))
