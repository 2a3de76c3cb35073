"""Request batching for the server: a bounded queue and one worker thread that runs the engine.

Waiting requests with the same generation settings are taken together, up to the engine's
max_batch, and generated as one batch (the runtime's right-padded batch); each request gets
its text pieces through its own asyncio queue as they are produced. When the queue is full a
new request is refused at once (HTTP 429) instead of piling up; after shutdown, with 503.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from compiler.runtime.engine import Engine, Generation, GenerationConfig


class Overloaded(Exception):
    """The queue is full (429)."""


class ShuttingDown(Exception):
    """The server is stopping (503)."""


@dataclass
class Job:
    prompt: str | list[dict]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # text pieces, then a Generation (done) or an Exception
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine = engine
        self.max_batch = engine.config.max_batch
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._held: list[Job] = []  # taken from the queue but not batchable with the current batch
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="kiln-batcher", daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + len(self._held)

    def submit(self, job: Job) -> None:
        if self._stop.is_set():
            raise ShuttingDown()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Overloaded() from None

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)

    # -- the worker ----------------------------------------------------------------------------
    def _next_batch(self) -> list[Job]:
        first = self._held.pop(0) if self._held else self.jobs.get(timeout=0.1)
        batch, rest = [first], []
        while len(batch) < self.max_batch:
            try:
                job = self._held.pop(0) if self._held else self.jobs.get_nowait()
            except queue.Empty:
                break
            (batch if job.config == first.config else rest).append(job)
        self._held = rest + self._held
        return batch

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._next_batch()
            except queue.Empty:
                continue
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        def send(job: Job, item) -> None:
            job.loop.call_soon_threadsafe(job.out.put_nowait, item)

        gens = [Generation("", [], "length") for _ in batch]
        try:  # each request is answered as soon as its own row is complete
            for i, piece in self.engine.run_rows([j.prompt for j in batch], batch[0].config, gens):
                if piece is None:
                    send(batch[i], gens[i])
                else:
                    gens[i].text += piece
                    send(batch[i], piece)
        except Exception as e:  # noqa: BLE001  (reported to every waiting client)
            for job in batch:
                send(job, e)
