"""The engine core: the one generation loop behind generate(), stream(), `kiln run` and `kiln serve`.

    core = EngineCore(engine, SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512))
    rid = core.add_request(prompt_ids, GenerationConfig(max_new_tokens=64))  # validated here
    while core.has_work:
        for out in core.step(): ...        # text pieces; out.finished carries the Generation
    core.cancel(rid)                        # freed at the next step

A step is schedule -> execute -> update, on the seams of vLLM's v1 engine:
- the scheduler (`runtime/scheduler.py`) turns the waiting and running requests and the token
  budget into a StepPlan (decodes, prompt chunks, speculative proposals);
- the model runner (`runtime/model_runner.py`) assembles and makes the engine calls, samples
  and verifies proposals;
- the core here turns each request's new tokens into text and outputs, and ends requests,
  handing their KV back to the KV manager (`runtime/kv_manager.py`), the one owner of rows,
  blocks and prefix reuse.
The core drives any `Session` (`runtime/session_api.py`) by its declared capabilities.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from compiler.runtime.generation import GenerationConfig, Timing
from compiler.runtime.grammar import Grammars
from compiler.runtime.kv_manager import KVManager
from compiler.runtime.logprobs import MAX_TOP, TokenLogprob
from compiler.runtime.model_runner import Fed, ModelRunner
from compiler.runtime.request import Request, StepOutput
from compiler.runtime.rows import row_count
from compiler.runtime.sampling import SamplingParams
from compiler.runtime.scheduler import Scheduler, SchedulerConfig, StepPlan
from compiler.runtime.speculative import Speculator
from compiler.runtime.text import TextStream

__all__ = ["EngineCore", "SchedulerConfig", "StepOutput"]


class EngineCore:
    def __init__(self, engine, config: SchedulerConfig | None = None):
        self.engine, self.cfg = engine, engine.config
        self.sched = sched = config or SchedulerConfig()
        caps = engine.session.capabilities
        rows = row_count(self.cfg, caps.sliceable, sched.max_num_seqs, sched.kv_cache_gib)
        self.kv = KVManager(engine.session, self.cfg, rows, sched.kv_cache_gib, sched.prefix_cache_tokens,
                            sched.prefix_block_size)
        self.spec = None
        if sched.speculative is not None:
            if not (caps.sliceable and caps.logits_at_every_position):
                raise ValueError("speculative decoding runs on CPU (ONNX Runtime) engines; this engine binds every row "
                                 "each step")
            self.spec = Speculator(engine, sched.speculative, rows)
        self.scheduler = Scheduler(sched, self.kv, self.spec, self.cfg.max_seq)
        self.runner = ModelRunner(engine, self.kv, self.spec)
        self.grammars = Grammars(engine.text, self.cfg.vocab_size, list(self.cfg.generation.eos_token_ids))
        self._ids = itertools.count()
        self.stats = {"steps": 0, "batched_tokens": 0, "prefill_tokens": 0, "decode_tokens": 0, "cancelled": 0,
                      "proposed": 0, "accepted": 0}

    # -- requests --------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], config: GenerationConfig) -> int:
        """Raise ValueError naming what is wrong with a request (and the fix); else return the
        tokens it may generate. Reads only fixed settings: safe from another thread."""
        M = self.cfg.max_seq
        if not 0 < len(prompt_ids) < M:
            raise ValueError(f"prompt length must be 1..{M - 1} tokens for this engine (max_seq {M}), got {len(prompt_ids)}")
        if config.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
        if config.seed is not None and not 0 <= config.seed < 2**63:
            raise ValueError(f"seed must be in 0..2^63-1, got {config.seed}")
        SamplingParams(config.temperature, config.top_k, config.top_p)  # raises on a bad setting
        self._check_outputs(config)
        limit = min(config.max_new_tokens, M - len(prompt_ids))
        self.kv.check_fits(len(prompt_ids), limit)
        return limit

    def _check_outputs(self, config: GenerationConfig) -> None:
        """Grammars and logprobs need the logits on the host; prompt logprobs every position's."""
        caps = self.engine.session.capabilities
        asked = [name for name, on in (("grammar", config.grammar is not None), ("logprobs", config.logprobs is not None),
                                       ("prompt_logprobs", config.prompt_logprobs is not None)) if on]
        if asked and caps.samples:
            raise ValueError(f"{asked[0]} needs the logits, and this engine samples inside its graph; use an engine built "
                             "without in-graph sampling")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(config, name)
            if k is not None and not 0 <= k <= MAX_TOP:
                raise ValueError(f"{name} must be 0..{MAX_TOP} alternatives, got {k}")
        if config.prompt_logprobs is not None and not (caps.sliceable and caps.logits_at_every_position):
            raise ValueError("prompt_logprobs (echo with logprobs) needs an engine that returns logits at every "
                             "position (CPU, ONNX Runtime)")
        if config.grammar is not None:
            self.grammars.check(config.grammar)

    def add_request(self, prompt_ids: list[int], config: GenerationConfig, priority: int = 0,
                    rng: np.random.Generator | None = None) -> int:
        """Queue a request (lower priority values run first; then arrival order). A bad one raises
        ValueError here and touches nothing else. rng: its sampler (default: seeded by config.seed)."""
        limit = self.validate(prompt_ids, config)
        params = SamplingParams(config.temperature, config.top_k, config.top_p)
        stops = config.stop_token_ids if config.stop_token_ids is not None else self.cfg.generation.eos_token_ids
        req = Request(next(self._ids), list(prompt_ids), len(prompt_ids), config, params,
                      rng or np.random.default_rng(config.seed), frozenset(stops), TextStream(self.engine.text, config.stop),
                      limit, priority, list(prompt_ids))
        req.gen.timing = Timing(prompt_tokens=len(prompt_ids))
        if config.grammar is not None:
            req.constraint = self.grammars.constraint(config.grammar)
        if config.logprobs is not None:
            req.gen.logprobs = []
        if config.prompt_logprobs is not None:
            req.gen.prompt_logprobs = [None]  # the first prompt token has no logprob
        self.scheduler.add(req)
        return req.id

    def cancel(self, request_id: int) -> None:
        self.scheduler.cancel(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def generated(self) -> dict[int, int]:
        """Tokens generated so far by each running request (what a replay times them by)."""
        return {r.id: len(r.gen.token_ids) for r in self.scheduler.running}

    # -- one step: schedule -> execute -> update ---------------------------------------------------
    def step(self) -> list[StepOutput]:
        outs: list[StepOutput] = []
        plan = self.scheduler.schedule()
        for req in plan.cancelled:
            req.gen.finish_reason = "cancelled"
            self._release(req)
            self.stats["cancelled"] += 1
            outs.append(StepOutput(req.id, finished=True, generation=req.gen))
        if plan.empty:
            return outs
        now = time.perf_counter()
        for r, _ in plan.chunks:
            r.t_start = r.t_start or now
        for fed in self.runner.execute(plan, self.scheduler.running):
            self._update(fed, outs)
        self._count(plan)
        return outs

    def _update(self, f: Fed, outs: list[StepOutput]) -> None:
        r = f.req
        if f.error is not None:
            self._fail(r, f.error, outs)
            return
        if f.proposed:
            r.gen.timing.proposed += f.proposed
            r.gen.timing.accepted += f.accepted
            self.stats["proposed"] += f.proposed
            self.stats["accepted"] += f.accepted
        else:
            if self.spec is not None and r.fed <= r.prompt_len:  # a prompt chunk: a draft reads it too
                self.spec.prefill(r.id, r.tokens[:r.fed])
            self.kv.keep(r, f.before)  # any prefix block it completed
        if f.prompt_logprobs and r.gen.prompt_logprobs is not None:
            r.gen.prompt_logprobs += f.prompt_logprobs
        for i, tok in enumerate(f.tokens):
            self._advance(r, tok, outs, f.logprobs[i] if f.logprobs else None)
            if r.row is None:  # it finished
                break

    def _count(self, plan: StepPlan) -> None:
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += len(plan.decodes) + len(plan.proposals)
        self.stats["prefill_tokens"] += sum(n for _, n in plan.chunks)
        self.stats["batched_tokens"] = plan.tokens

    # -- after a token ---------------------------------------------------------------------------
    def _advance(self, r: Request, tok: int, outs: list[StepOutput], lp: TokenLogprob | None = None) -> None:
        now, timing, gen = time.perf_counter(), r.gen.timing, r.gen
        if not gen.token_ids and not r.t_first:
            r.t_first = now
            timing.prefill_ms = (now - r.t_start) * 1e3
        else:
            timing.decode_steps += 1
            timing.decode_s = now - r.t_first
        if r.constraint is not None and not r.constraint.accept(tok):
            self._fail(r, ValueError(f"the output broke its grammar at token {tok}: {r.constraint.error}"), outs)
            return
        text, done, lps = "", tok in r.stops, []
        if not done:
            gen.token_ids.append(tok)
            text = r.stream.push(tok)
            done = r.stream.stopped or (r.constraint is not None and r.constraint.done)
            if lp is not None and gen.logprobs is not None:
                gen.logprobs.append(lp)
                lps = [lp]
        if done:
            gen.finish_reason = "stop"
        done = done or len(gen.token_ids) >= r.limit
        if done:
            text += r.stream.finish()
            gen.text += text
            self._finish(r)
            outs.append(StepOutput(r.id, text, finished=True, generation=gen, logprobs=lps))
            return
        gen.text += text
        r.pending = [tok]
        r.tokens.append(tok)
        if text or lps:
            outs.append(StepOutput(r.id, text, logprobs=lps))

    def _fail(self, r: Request, error: Exception, outs: list[StepOutput]) -> None:
        r.gen.finish_reason = "error"
        self._finish(r)
        outs.append(StepOutput(r.id, finished=True, generation=r.gen, error=error))

    def _finish(self, r: Request) -> None:
        self.scheduler.finish(r)
        self._release(r)

    def _release(self, req: Request) -> None:
        if self.spec is not None:
            self.spec.release(req.id)
        self.kv.release(req)
