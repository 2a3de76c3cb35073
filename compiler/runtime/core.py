"""The engine core: the one generation loop behind generate(), stream(), `kiln run` and `kiln serve`.

    core = EngineCore(engine, SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512))
    rid = core.add_request(prompt_ids, GenerationConfig(max_new_tokens=64))  # validated here
    while core.has_work:
        for out in core.step(): ...        # text pieces; out.finished carries the Generation
    core.cancel(rid)                        # freed at the next step

Each step spends a token budget: every running decode first (one token each, so a long prompt
never stalls them), then prompt chunks of the sequences still prefilling, in priority and arrival
order (chunked prefill, as in Sarathi / vLLM). A sequence holds one row of the engine's KV cache
(`runtime/rows.py`); a step runs only the rows that have work: the decodes as one call over their
rows, each prefill chunk as a call over its own row, positions continuing from its past, and
neighbouring calls merged where one padded call costs less (`runtime/packing.py`). Host rows are
paged by the OS and admitted under a block budget (`runtime/kv_memory.py`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from compiler.runtime.generation import Generation, GenerationConfig, Timing
from compiler.runtime.kv_memory import KVBlocks
from compiler.runtime.packing import pack
from compiler.runtime.rows import RowPool, row_count
from compiler.runtime.sampling import SamplingParams, sample
from compiler.runtime.speculative import SpeculativeConfig, Speculator
from compiler.runtime.text import TextStream


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int | None = None  # sequences running at once (KV rows); None: see rows.row_count
    kv_cache_gib: float | None = None  # KV memory budget: blocks of host rows, or whole device rows
    max_num_batched_tokens: int = 512  # tokens one step feeds: all decodes, then prompt chunks
    prefix_cache_tokens: int = 0  # KV kept for prefix reuse (0: off); CPU engines
    prefix_block_size: int = 16  # tokens per prefix block
    speculative: SpeculativeConfig | None = None  # propose and verify several tokens a step

    def __post_init__(self):
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}; give --max-num-seqs a positive count")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}; give "
                             "--max-num-batched-tokens a positive count")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}; give --kv-cache-gib a positive size in GiB")
        if self.prefix_cache_tokens < 0 or self.prefix_block_size < 1:
            raise ValueError("prefix_cache_tokens must be >= 0 and prefix_block_size >= 1")


@dataclass
class StepOutput:
    request_id: int
    text: str = ""  # text that became final in this step
    finished: bool = False
    generation: Generation | None = None  # set when finished (finish_reason stop | length | cancelled | error)
    error: Exception | None = None  # the engine failed on this request


@dataclass
class _Request:
    id: int
    tokens: list[int]  # the prompt, then each generated token once it is fed
    prompt_len: int
    config: GenerationConfig
    params: SamplingParams
    rng: np.random.Generator
    stops: frozenset
    stream: TextStream
    limit: int  # tokens it may generate: max_new_tokens, within the cache
    priority: int = 0
    pending: list[int] = field(default_factory=list)  # tokens to feed: the prompt's rest, then the last token
    fed: int = 0  # tokens already in its cache row (= the position of pending[0])
    row: int | None = None
    cancelled: bool = False
    gen: Generation = field(default_factory=lambda: Generation("", [], "length"))
    t_start: float = 0.0  # first prefill call
    t_first: float = 0.0  # first token

    @property
    def prefilling(self) -> bool:
        return self.fed < self.prompt_len


class EngineCore:
    def __init__(self, engine, config: SchedulerConfig | None = None):
        self.engine, self.cfg = engine, engine.config
        self.sched = config or SchedulerConfig()
        sliceable = getattr(engine.session, "cache_rows", None) is not None
        self.rows = RowPool(engine.session, row_count(self.cfg, sliceable, self.sched.max_num_seqs, self.sched.kv_cache_gib))
        self.blocks = KVBlocks.for_budget(self.cfg.kv_cache, self.sched.kv_cache_gib) if sliceable else None
        self.samples = bool(getattr(engine.session, "samples", False))
        self.prefix = self._prefix_cache()
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self._ids = itertools.count()
        self.stats = {"steps": 0, "batched_tokens": 0, "prefill_tokens": 0, "decode_tokens": 0, "cancelled": 0,
                      "proposed": 0, "accepted": 0}
        self.spec = None
        if self.sched.speculative is not None:
            if not self.rows.sliceable:
                raise ValueError("speculative decoding runs on CPU (ONNX Runtime) engines; this engine binds every row "
                                 "each step")
            self.spec = Speculator(engine, self.sched.speculative, self.rows.rows)

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
        limit = min(config.max_new_tokens, M - len(prompt_ids))
        if self.blocks is not None and not self.blocks.fits_ever(len(prompt_ids) + limit):
            cap = self.blocks.capacity * self.blocks.block_tokens
            raise ValueError(f"this request needs KV for {len(prompt_ids) + limit} tokens ({len(prompt_ids)} prompt + "
                             f"{limit} new) but the KV budget of {self.blocks.budget_gib} GiB holds {cap}; "
                             f"raise --kv-cache-gib or lower max_tokens")
        return limit

    def add_request(self, prompt_ids: list[int], config: GenerationConfig, priority: int = 0,
                    rng: np.random.Generator | None = None) -> int:
        """Queue a request (lower priority values run first; then arrival order). A bad one raises
        ValueError here and touches nothing else. rng: its sampler (default: seeded by config.seed)."""
        limit = self.validate(prompt_ids, config)
        params = SamplingParams(config.temperature, config.top_k, config.top_p)
        stops = config.stop_token_ids if config.stop_token_ids is not None else self.cfg.generation.eos_token_ids
        req = _Request(next(self._ids), list(prompt_ids), len(prompt_ids), config, params,
                       rng or np.random.default_rng(config.seed), frozenset(stops), TextStream(self.engine.text, config.stop),
                       limit, priority, list(prompt_ids))
        req.gen.timing = Timing(prompt_tokens=len(prompt_ids))
        self.waiting.append(req)
        return req.id

    def cancel(self, request_id: int) -> None:
        for req in itertools.chain(self.waiting, self.running):
            if req.id == request_id:
                req.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def generated(self) -> dict[int, int]:
        """Tokens generated so far by each running request (what a replay times them by)."""
        return {r.id: len(r.gen.token_ids) for r in self.running}

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outs: list[StepOutput] = []
        self._reap_cancelled(outs)
        self._admit()
        decodes = [r for r in self.running if not r.prefilling]
        guesses = self._proposals(decodes)  # speculating sequences: verified each in a step of its own
        decodes = [r for r in decodes if r.id not in guesses]
        budget = max(self.sched.max_num_batched_tokens - len(decodes) - sum(len(g) + 1 for g in guesses.values()), 0)
        chunks, computing = [], set()  # prefix blocks this step's chunks will complete
        for r in sorted((r for r in self.running if r.prefilling), key=lambda r: (r.priority, r.id)):
            self._reuse_prefix(r)
            if computing and self._next_block(r, r.fed + self.sched.prefix_block_size) in computing:
                continue  # another request computes this prefix right now: reuse it next step
            n = min(r.prompt_len - r.fed, budget)
            if n <= 0:
                break
            if self.prefix is not None:
                computing.update(self._prefix_keys(r, r.fed + n))
            if self.prefix is not None and not r.t_start:  # its first chunk: count what reuse saved
                self.prefix.count(r.prompt_len, r.fed)
            chunks.append((r, n))
            budget -= n
        if not decodes and not chunks and not guesses:
            return outs
        self._run(decodes, chunks, outs)
        for r in [r for r in self.running if r.id in guesses]:
            self._speculate(r, guesses[r.id], outs)
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += len(decodes) + len(guesses)
        self.stats["prefill_tokens"] += sum(n for _, n in chunks)
        self.stats["batched_tokens"] = len(decodes) + sum(n for _, n in chunks) + sum(len(g) + 1 for g in guesses.values())
        return outs

    # -- speculative decoding (runtime/speculative.py) -------------------------------------------
    def _proposals(self, decodes: list[_Request]) -> dict[int, list[int]]:
        if self.spec is None:
            return {}
        out = {}
        for r in decodes:
            room = min(r.limit - len(r.gen.token_ids) - 1, self.cfg.max_seq - 1 - r.fed)
            guess = self.spec.propose(r.id, r.tokens, room)
            if guess:
                out[r.id] = guess
        return out

    def _speculate(self, r: _Request, guess: list[int], outs: list[StepOutput]) -> None:
        """Feed the last token and the proposals in one step of r's row alone, keep what the
        target accepts and its own next token; the rest of the row is past r's length."""
        tokens, fed = r.pending[:1] + guess, r.fed
        try:
            io = self.rows.binding(r.row, r.row + 1)
            logits = self.engine.session.step(io, np.asarray([tokens]), (fed + np.arange(len(tokens)))[None],
                                              np.arange(len(tokens))[None])[0]  # [k + 1, V]
        except Exception as e:  # noqa: BLE001  (this request fails; the others go on)
            self._fail(r, e, outs)
            return
        n, nxt = self.spec.verify(r.id, guess, logits, r.params, r.rng, fed + 1)
        r.fed = fed + 1 + n
        r.gen.timing.proposed += len(guess)
        r.gen.timing.accepted += n
        self.stats["proposed"] += len(guess)
        self.stats["accepted"] += n
        for tok in guess[:n] + [nxt]:
            self._advance(r, tok, outs)
            if r.row is None:  # it finished
                break

    def _reap_cancelled(self, outs: list[StepOutput]) -> None:
        for queue in (self.waiting, self.running):
            for req in [r for r in queue if r.cancelled]:
                queue.remove(req)
                req.gen.finish_reason = "cancelled"
                self._release(req)
                self.stats["cancelled"] += 1
                outs.append(StepOutput(req.id, finished=True, generation=req.gen))

    def _admit(self) -> None:
        self.waiting.sort(key=lambda r: (r.priority, r.id))
        while self.waiting and self.rows.free:
            req = self.waiting[0]
            if self.blocks is not None and not self.blocks.reserve(req.id, req.prompt_len + req.limit):
                return  # waits for blocks (in order: a large request is not starved by small ones)
            self.waiting.pop(0)
            req.row = self.rows.acquire()
            self.running.append(req)

    # -- prefix reuse ----------------------------------------------------------------------------
    def _prefix_cache(self):
        """A PrefixCache over this core's rows, when asked for and the cache is host memory."""
        from compiler.runtime.prefix_cache import PrefixCache

        arrays = getattr(self.rows.cache, "_arrays", None)
        if not self.sched.prefix_cache_tokens or not arrays or not self.rows.sliceable:
            return None
        blocks = max(self.sched.prefix_cache_tokens // self.sched.prefix_block_size, 1)
        return PrefixCache([a.shape[1:4:2] for a in arrays], arrays[0].dtype, self.sched.prefix_block_size, blocks)

    def _reuse_prefix(self, r: _Request) -> None:
        """Before a prompt chunk: copy in whatever longer prefix of it is stored now (another
        request may have computed it since this one was admitted)."""
        if self.prefix is None or r.fed % self.prefix.block_size:
            return
        blocks = self.prefix.match(r.tokens[: r.prompt_len])
        first = r.fed // self.prefix.block_size
        if len(blocks) > first:
            r.fed = self.prefix.load(blocks, self.rows.cache._arrays, r.row, first)
            r.pending = r.tokens[r.fed: r.prompt_len]

    def _prefix_keys(self, r: _Request, upto: int) -> list[bytes]:
        """Keys of the prefix blocks r completes while its cache grows from r.fed to upto tokens."""
        from compiler.runtime.prefix_cache import block_keys

        return block_keys(r.tokens, self.prefix.block_size, min(upto, r.prompt_len - 1))[r.fed // self.prefix.block_size:]

    def _next_block(self, r: _Request, upto: int) -> bytes | None:
        keys = self._prefix_keys(r, upto)
        return keys[0] if keys else None

    def _keep_prefix(self, r: _Request) -> None:
        if self.prefix is not None and r.fed >= self.prefix.block_size:
            self.prefix.store(r.tokens, r.fed, self.rows.cache._arrays, r.row)

    def _release(self, req: _Request) -> None:
        if self.spec is not None:
            self.spec.release(req.id)
        if self.blocks is not None:
            self.blocks.release(req.id)
        if req.row is not None:
            self.rows.release(req.row)
            req.row = None

    # -- running the engine ----------------------------------------------------------------------
    def _run(self, decodes: list[_Request], chunks: list[tuple[_Request, int]], outs: list[StepOutput]) -> None:
        """Feed every scheduled token; sample for each request whose input is now all in."""
        feeds = {r.row: (r, r.pending[:1]) for r in decodes}
        now = time.perf_counter()
        for r, n in chunks:
            r.t_start = r.t_start or now
        if self.rows.sliceable:  # the decodes and each prompt chunk, merged where one call costs less
            calls = pack(([feeds] if feeds else []) + [{r.row: (r, r.pending[:n])} for r, n in chunks],
                         self._starts().get, self.cfg.max_seq, self.cfg.graph_flavour != "ort-contrib")
        else:  # every call binds every row anyway: one call for all
            calls = [{**feeds, **{r.row: (r, r.pending[:n]) for r, n in chunks}}]
        for call in calls:
            try:
                results = self._call(call)
            except Exception as e:  # noqa: BLE001  (the requests of this call fail; the others go on)
                for r, _ in call.values():
                    self._fail(r, e, outs)
                continue
            for row, (r, tokens) in call.items():
                r.fed += len(tokens)
                r.pending = r.pending[len(tokens):]
                if self.spec is not None and r.fed <= r.prompt_len:  # a prompt chunk: a draft reads it too
                    self.spec.prefill(r.id, r.tokens[:r.fed])
                if r.fed // self.sched.prefix_block_size > (r.fed - len(tokens)) // self.sched.prefix_block_size:
                    self._keep_prefix(r)  # it completed a block
                if not r.pending:  # its input is all in: results[row] picks its next token
                    self._advance(r, results[row], outs)

    def _starts(self) -> dict[int, int]:
        """The position each row's next input goes to (0 for a free row)."""
        starts = dict.fromkeys(range(self.rows.rows), 0)
        starts.update((r.row, r.fed) for r in self.running)
        return starts

    def _call(self, call: dict[int, tuple[_Request, list[int]]]) -> dict[int, int]:
        """One engine call over a row span; returns the next token of each row in `call`."""
        lo, hi = self.rows.span(min(call), max(call) + 1)
        S = max(len(t) for _, t in call.values())
        pad, M = self.cfg.generation.pad_token_id, self.cfg.max_seq
        by_row = {r.row: r for r in self.running}
        ids = np.full((hi - lo, S), pad, dtype=np.int64)
        pos = np.zeros((hi - lo, S), dtype=np.int64)
        at = np.zeros((hi - lo, 1), dtype=np.int64)
        for b in range(hi - lo):
            r, tokens = call.get(lo + b) or (by_row.get(lo + b), [])
            start = r.fed if r is not None else 0  # a row without work: a dummy at its next position,
            ids[b, : len(tokens)] = tokens  # overwritten by that row's own next write
            pos[b] = np.minimum(start + np.arange(S), M - 1)
            at[b, 0] = max(len(tokens) - 1, 0)
        io = self.rows.binding(lo, hi)
        if self.samples:
            toks = self.engine.session.step(io, ids, pos, at, self._sampling_inputs(call, lo, hi))
            return {row: int(toks[row - lo]) for row in call}
        logits = self.engine.session.step(io, ids, pos, at)[:, 0]  # [B, V]
        out = {}
        for row, (r, tokens) in call.items():
            if len(tokens) == len(r.pending):  # final: sample (a non-final chunk's logits are unused)
                out[row] = int(sample(logits[row - lo : row - lo + 1], r.params, r.rng)[0])
        return out

    def _sampling_inputs(self, call: dict, lo: int, hi: int) -> dict:
        """kiln::Sample's per-row inputs; a row draws from its own generator only when it samples."""
        B = hi - lo
        t, k, p, u = np.zeros(B, np.float32), np.zeros(B, np.int64), np.ones(B, np.float32), np.zeros(B, np.float32)
        for row, (r, tokens) in call.items():
            b = row - lo
            t[b], k[b], p[b] = r.params.temperature, r.params.top_k, r.params.top_p
            if len(tokens) == len(r.pending) and not r.params.greedy:
                u[b] = r.rng.random()
        return {"temperature": t, "top_k": k, "top_p": p, "draws": u}

    # -- after a token ---------------------------------------------------------------------------
    def _advance(self, r: _Request, tok: int, outs: list[StepOutput]) -> None:
        now, timing, gen = time.perf_counter(), r.gen.timing, r.gen
        if not gen.token_ids and not r.t_first:
            r.t_first = now
            timing.prefill_ms = (now - r.t_start) * 1e3
        else:
            timing.decode_steps += 1
            timing.decode_s = now - r.t_first
        text, done = "", tok in r.stops
        if not done:
            gen.token_ids.append(tok)
            text = r.stream.push(tok)
            done = r.stream.stopped
        if done:
            gen.finish_reason = "stop"
        done = done or len(gen.token_ids) >= r.limit
        if done:
            text += r.stream.finish()
            gen.text += text
            self._finish(r)
            outs.append(StepOutput(r.id, text, finished=True, generation=gen))
            return
        gen.text += text
        r.pending = [tok]
        r.tokens.append(tok)
        if text:
            outs.append(StepOutput(r.id, text))

    def _fail(self, r: _Request, error: Exception, outs: list[StepOutput]) -> None:
        r.gen.finish_reason = "error"
        self._finish(r)
        outs.append(StepOutput(r.id, finished=True, generation=r.gen, error=error))

    def _finish(self, r: _Request) -> None:
        if r in self.running:
            self.running.remove(r)
        self._release(r)
