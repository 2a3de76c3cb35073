"""The server's worker: HTTP jobs in, the engine core's steps out.

One thread drives an EngineCore (`runtime/core.py`): it moves jobs from the bounded queue into
the core while the core has rows for them (so a full server answers 429 instead of hoarding
requests), cancels the requests whose clients have gone, runs a step (every decode, then prompt
chunks under the token budget) and hands each job its Pieces (text, logprobs) and Generation. A request the
core refuses (its settings, its length) gets its ValueError and nothing else changes; a step
that fails answers only the requests of the failing call (the core reports them).
"""

from __future__ import annotations

from compiler.runtime.core import StepOutput
from compiler.runtime.engine import Engine
from compiler.runtime.settings import RuntimeSettings
from compiler.serve.jobs import Job, Piece, Worker


class EngineWorker(Worker):
    def __init__(self, engine: Engine, max_queue: int = 64, settings: RuntimeSettings | None = None, metrics=None):
        self.core = (settings or RuntimeSettings()).core(engine)
        self.metrics = metrics
        self.jobs_by_request: dict[int, Job] = {}
        super().__init__(engine, max_queue, "kiln-engine")

    @property
    def depth(self) -> int:
        """Requests waiting: in the queue, or in the core without a row yet."""
        return self.jobs.qsize() + len(self.core.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.core.scheduler.running)

    def _in_flight(self) -> list[Job]:
        return list(self.jobs_by_request.values())

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._admit(block=not self.core.has_work)
            for rid, job in self.jobs_by_request.items():
                if job.cancelled:
                    self.core.cancel(rid)
            if self.core.has_work:
                outs = self.core.step()
                if self.metrics is not None:
                    self.metrics.step_tokens.observe(self.core.stats["batched_tokens"])
                for out in outs:
                    self._dispatch(out)

    def _admit(self, block: bool) -> None:
        """Jobs into the core while it has rows for them (the rest stay in the bounded queue)."""
        while len(self.core.scheduler.waiting) < max(self.core.kv.free_rows, 1):
            job = self._take(block)
            if job is None:
                return
            block = False
            try:
                rid = self.core.add_request(job.ids, job.config)
            except ValueError as e:  # this request's settings: only it is refused
                job.send(e)
                continue
            self.jobs_by_request[rid] = job

    def _dispatch(self, out: StepOutput) -> None:
        job = self.jobs_by_request.get(out.request_id)
        if job is None:
            return
        if out.text or out.logprobs:
            job.send(Piece(out.text, tuple(out.logprobs)))
        if out.finished:
            del self.jobs_by_request[out.request_id]
            if out.error is not None:
                job.send(out.error)
            elif out.generation.finish_reason != "cancelled":
                job.send(out.generation)
