"""In-flight (continuous) batching for the server: requests join and leave a running batch.

The engine's static KV cache has max_batch rows; each row is a slot. Two kinds of step:
  - prefill, when every busy slot starts at position 0: each feeds its whole prompt (positions
    0..L-1, right-padded; logits read at L-1), free slots feed padding into their own rows;
  - decode, otherwise: one token per slot. A decoding slot feeds its last token; a slot that
    arrived while others decode feeds its prompt one token a step (ONNX Runtime's fused GQA
    takes several new tokens only without past context) and samples once its prompt is in.
Each slot samples with its own settings and seed, stops on its own, and is answered and freed
at once: a new request joins the running batch instead of waiting for it to drain. A cancelled
request (its client went away) is dropped before the next step, which frees its slot.

A failure in admitting a request (its settings) goes to that request, one in sampling to its
slot's request, one in the forward step to the requests of that step; the loop goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.runtime.engine import Engine, Generation
from compiler.runtime.sampling import SamplingParams, sample
from compiler.runtime.text import TextStream
from compiler.serve.jobs import Job, Worker


@dataclass
class _Slot:
    job: Job
    ids: list[int]  # ids still to feed: the prompt on arrival, then [last token]
    stream: TextStream
    params: SamplingParams
    rng: np.random.Generator
    stops: set[int]
    pos: int = 0  # position of ids[0]
    gen: Generation = field(default_factory=lambda: Generation("", [], "length"))


class Scheduler(Worker):
    def __init__(self, engine: Engine, max_queue: int = 64):
        self.cfg = engine.config
        self.slots: list[_Slot | None] = [None] * self.cfg.max_batch
        super().__init__(engine, max_queue, "kiln-scheduler")

    def _in_flight(self) -> list[Job]:
        return [s.job for s in self.slots if s is not None]

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        s = self.engine.session
        self.io = s.binding(s.new_cache(self.cfg.max_batch))
        while not self._stop.is_set():
            for b, slot in enumerate(self.slots):
                if slot is not None and slot.job.cancelled:
                    self.slots[b] = None
            self._admit(block=not any(self.slots))
            if any(self.slots):
                self._step()

    def _admit(self, block: bool) -> None:
        for b in range(len(self.slots)):
            while self.slots[b] is None:
                job = self._take(block)
                if job is None:
                    return
                block = False
                try:
                    self.slots[b] = self._slot(job)
                except Exception as e:  # noqa: BLE001  (this request's settings: its error only)
                    job.send(e)

    def _slot(self, job: Job) -> _Slot:
        c, M = job.config, self.cfg.max_seq
        if not 0 < len(job.ids) < M:
            raise ValueError(f"prompt length must be 1..{M - 1} tokens, got {len(job.ids)}")
        stops = set(c.stop_token_ids if c.stop_token_ids is not None else self.cfg.generation.eos_token_ids)
        return _Slot(job, list(job.ids), TextStream(self.engine.text, c.stop), SamplingParams(c.temperature, c.top_k, c.top_p),
                     np.random.default_rng(c.seed), stops)

    def _step(self) -> None:
        active = [(b, s) for b, s in enumerate(self.slots) if s is not None]
        if any(s.pos > 0 for _, s in active):  # something has past context: one token per slot
            feeds = {b: s.ids[:1] for b, s in active}
        else:  # every slot starts from position 0: whole prompts at once
            feeds = {b: s.ids for b, s in active}
        try:
            logits = self._forward(feeds)
        except Exception as e:  # noqa: BLE001  (the step's requests get the error; the loop goes on)
            for b, slot in active:
                self._end(b, e)
            return
        for b, slot in active:
            fed = len(feeds[b])
            slot.pos += fed
            slot.ids = slot.ids[fed:]
            if not slot.ids:  # its input is all in: the logits are for its next token
                try:
                    self._advance(b, slot, logits[b : b + 1])
                except Exception as e:  # noqa: BLE001  (this slot's request only)
                    self._end(b, e)

    def _forward(self, feeds: dict[int, list[int]]) -> np.ndarray:
        """One engine step: each slot's feed into its own row; the logits at each row's last fed token [B, V]."""
        B, M, pad = len(self.slots), self.cfg.max_seq, self.cfg.generation.pad_token_id
        S = max(len(f) for f in feeds.values())
        ids = np.full((B, S), pad, dtype=np.int64)
        pos = np.broadcast_to(np.arange(S), (B, S)).copy()
        at = np.zeros((B, 1), dtype=np.int64)
        for b, f in feeds.items():
            ids[b, : len(f)] = f
            pos[b] = np.minimum(self.slots[b].pos + np.arange(S), M - 1)
            at[b, 0] = len(f) - 1
        return self.engine.session.step(self.io, ids, pos, at)[:, 0]

    def _advance(self, b: int, slot: _Slot, logits: np.ndarray) -> None:
        tok = int(sample(logits, slot.params, slot.rng)[0])
        done = tok in slot.stops
        if not done:
            slot.gen.token_ids.append(tok)
            piece = slot.stream.push(tok)
            if piece:
                slot.gen.text += piece
                slot.job.send(piece)
            done = slot.stream.stopped
        if done:
            slot.gen.finish_reason = "stop"
        elif len(slot.gen.token_ids) >= slot.job.config.max_new_tokens or slot.pos >= self.cfg.max_seq - 1:
            done = True
        if done:
            rest = slot.stream.finish()
            if rest:
                slot.gen.text += rest
                slot.job.send(rest)
            self._end(b, slot.gen)
        else:
            slot.ids = [tok]

    def _end(self, b: int, result: Generation | Exception) -> None:
        """Answer slot b's request (its Generation or an error) and free the slot."""
        slot, self.slots[b] = self.slots[b], None
        slot.job.send(result)
