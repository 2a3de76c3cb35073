"""In-flight (continuous) batching for the server: requests join and leave a running batch.

The engine's static KV cache has max_batch rows; each row is a slot. Two kinds of step:
  - prefill, when every busy slot starts at position 0: each feeds its whole prompt (positions
    0..L-1, right-padded; logits read at L-1), free slots feed padding into their own rows;
  - decode, otherwise: one token per slot. A decoding slot feeds its last token; a slot that
    arrived while others decode feeds its prompt one token a step (ONNX Runtime's fused GQA
    takes several new tokens only without past context) and samples once its prompt is in.
Each slot samples with its own settings and seed, stops on its own, and is answered and freed
at once: a new request joins the running batch instead of waiting for it to drain.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from compiler.runtime.engine import Engine, Generation
from compiler.runtime.sampling import SamplingParams, sample
from compiler.runtime.text import TextStream
from compiler.serve.batcher import Job, Overloaded, ShuttingDown


@dataclass
class _Slot:
    job: Job
    ids: list[int]  # ids still to feed: the prompt on arrival, then [last token]
    pos: int = 0  # position of ids[0]
    gen: Generation = field(default_factory=lambda: Generation("", [], "length"))
    stream: TextStream | None = None
    params: SamplingParams | None = None
    rng: np.random.Generator | None = None
    stops: set = field(default_factory=set)


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine, self.cfg = engine, engine.config
        self.slots: list[_Slot | None] = [None] * self.cfg.max_batch
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="kiln-scheduler", daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

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

    # -- the loop ------------------------------------------------------------------------------
    def _work(self) -> None:
        s = self.engine.session
        self.io = s.binding(s.new_cache(self.cfg.max_batch))
        while not self._stop.is_set():
            self._admit(block=not any(self.slots))
            if any(self.slots):
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001  (reported to every request in flight)
                    for i, slot in enumerate(self.slots):
                        if slot is not None:
                            self._send(slot.job, e)
                            self.slots[i] = None

    def _admit(self, block: bool) -> None:
        for i in range(len(self.slots)):
            if self.slots[i] is not None:
                continue
            try:
                job = self.jobs.get(timeout=0.1) if block else self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            self.slots[i] = self._slot(job)

    def _slot(self, job: Job) -> _Slot | None:
        c, text = job.config, self.engine.text
        ids = text.prompt_ids(job.prompt, c.chat)
        if not 0 < len(ids) < self.cfg.max_seq:
            self._send(job, ValueError(f"prompt length must be 1..{self.cfg.max_seq - 1} tokens, got {len(ids)}"))
            return None
        stops = set(c.stop_token_ids if c.stop_token_ids is not None else self.cfg.generation.eos_token_ids)
        return _Slot(job, ids, 0, stream=TextStream(text, c.stop), params=SamplingParams(c.temperature, c.top_k, c.top_p),
                     rng=np.random.default_rng(c.seed), stops=stops)

    def _step(self) -> None:
        active = [(b, s) for b, s in enumerate(self.slots) if s is not None]
        if any(s.pos > 0 for _, s in active):  # something has past context: one token per slot
            feeds = {b: s.ids[:1] for b, s in active}
        else:  # every slot starts from position 0: whole prompts at once
            feeds = {b: s.ids for b, s in active}
        B, M, pad = len(self.slots), self.cfg.max_seq, self.cfg.generation.pad_token_id
        S = max(len(f) for f in feeds.values())
        ids = np.full((B, S), pad, dtype=np.int64)
        pos = np.broadcast_to(np.arange(S), (B, S)).copy()
        at = np.zeros((B, 1), dtype=np.int64)
        for b, f in feeds.items():
            ids[b, : len(f)] = f
            pos[b] = np.minimum(self.slots[b].pos + np.arange(S), M - 1)
            at[b, 0] = len(f) - 1
        logits = self.engine.session.step(self.io, ids, pos, at)[:, 0]  # [B, V]
        for b, slot in active:
            fed = len(feeds[b])
            slot.pos += fed
            slot.ids = slot.ids[fed:]
            if not slot.ids:  # its input is all in: the logits are for its next token
                self._advance(b, slot, logits[b : b + 1])

    def _advance(self, b: int, slot: _Slot, logits: np.ndarray) -> None:
        tok = int(sample(logits, slot.params, slot.rng)[0])
        done = tok in slot.stops
        if not done:
            slot.gen.token_ids.append(tok)
            piece = slot.stream.push(tok)
            if piece:
                slot.gen.text += piece
                self._send(slot.job, piece)
            done = slot.stream.stopped
        if done:
            slot.gen.finish_reason = "stop"
        elif len(slot.gen.token_ids) >= slot.job.config.max_new_tokens or slot.pos >= self.cfg.max_seq - 1:
            done = True
        if done:
            rest = slot.stream.finish()
            if rest:
                slot.gen.text += rest
                self._send(slot.job, rest)
            self._send(slot.job, slot.gen)
            self.slots[b] = None
        else:
            slot.ids = [tok]

    @staticmethod
    def _send(job: Job, item) -> None:
        job.loop.call_soon_threadsafe(job.out.put_nowait, item)
