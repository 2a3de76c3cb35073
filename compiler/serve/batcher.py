"""Static batching for the server: waiting requests with the same settings form whole batches.

Waiting requests with the same generation settings are taken together, up to the engine's
max_batch, and generated as one batch (the runtime's right-padded batch); each request gets
its text pieces through its own asyncio queue as they are produced. When the queue is full a
new request is refused at once (HTTP 429) instead of piling up; after shutdown, with 503.

A batch's rows are fixed while it runs: a cancelled request gets nothing more, and the batch
stops as soon as every one of its requests is cancelled. Cancelled requests still waiting are
skipped. A failing batch reports its exception to its own requests; the loop goes on.
"""

from __future__ import annotations

from contextlib import closing

from compiler.runtime.engine import Engine, Generation
from compiler.serve.jobs import Job, Worker


class Batcher(Worker):
    def __init__(self, engine: Engine, max_queue: int = 64):
        self.max_batch = engine.config.max_batch
        self._held: list[Job] = []  # taken from the queue but not batchable with the current batch
        self._batch: list[Job] = []  # the batch running now
        super().__init__(engine, max_queue, "kiln-batcher")

    @property
    def depth(self) -> int:
        return super().depth + len(self._held)

    def _in_flight(self) -> list[Job]:
        return self._batch + self._held

    # -- the worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self._batch = batch
                self._generate(batch)
                self._batch = []

    def _next(self, block: bool) -> Job | None:
        while self._held:
            job = self._held.pop(0)
            if not job.cancelled:
                return job
        return self._take(block)

    def _next_batch(self) -> list[Job]:
        first = self._next(block=True)
        if first is None:
            return []
        batch, rest = [first], []
        while len(batch) < self.max_batch:
            job = self._next(block=False)
            if job is None:
                break
            (batch if job.config == first.config else rest).append(job)
        self._held = rest + self._held
        return batch

    def _generate(self, batch: list[Job]) -> None:
        gens = [Generation("", [], "length") for _ in batch]
        try:  # each request is answered as soon as its own row is complete
            with closing(self.engine.run_ids([j.ids for j in batch], batch[0].config, gens)) as rows:
                for i, piece in rows:
                    if all(j.cancelled for j in batch):
                        return
                    if piece is None:
                        batch[i].send(gens[i])
                    else:
                        gens[i].text += piece
                        batch[i].send(piece)
        except Exception as e:  # noqa: BLE001  (reported to this batch's requests)
            for job in batch:
                job.send(e)
