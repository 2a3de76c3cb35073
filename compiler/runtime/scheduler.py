"""The scheduler: waiting and running sequences and a token budget -> the plan of one step.

Each step spends `max_num_batched_tokens`: every running decode first (one token each, so a long
prompt never stalls them), a speculating sequence its last token and its proposals, then prompt
chunks of the sequences still prefilling, in priority and arrival order (chunked prefill, as in
Sarathi / vLLM). Waiting requests are admitted in that same order while the KV manager gives
them a row and blocks; a request that does not fit waits, and so does everyone behind it (a
large request is not starved by small ones). Two chunks that would compute the same prefix
block in one step do not: the later one reuses the block next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler.runtime.kv_manager import KVManager
from compiler.runtime.request import Request
from compiler.runtime.speculative import SpeculativeConfig, Speculator


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
class StepPlan:
    cancelled: list[Request] = field(default_factory=list)  # taken out of the queues: the core ends them
    decodes: list[Request] = field(default_factory=list)  # one token each: pending[:1]
    chunks: list[tuple[Request, int]] = field(default_factory=list)  # prompt chunks: (request, tokens)
    proposals: dict[int, list[int]] = field(default_factory=dict)  # request id -> proposed tokens

    @property
    def empty(self) -> bool:
        return not (self.decodes or self.chunks or self.proposals)

    @property
    def tokens(self) -> int:
        """Tokens the step feeds."""
        return len(self.decodes) + sum(n for _, n in self.chunks) + sum(len(g) + 1 for g in self.proposals.values())


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVManager, spec: Speculator | None, max_seq: int):
        self.cfg, self.kv, self.spec, self.max_seq = config, kv, spec, max_seq
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def cancel(self, request_id: int) -> None:
        for req in self.waiting + self.running:
            if req.id == request_id:
                req.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)

    def schedule(self) -> StepPlan:
        plan = StepPlan(cancelled=self._reap())
        self._admit()
        decodes = [r for r in self.running if not r.prefilling]
        plan.proposals = self._proposals(decodes)  # each verified in a call of its own
        plan.decodes = [r for r in decodes if r.id not in plan.proposals]
        plan.chunks = self._chunks(max(self.cfg.max_num_batched_tokens - plan.tokens, 0))
        return plan

    def _reap(self) -> list[Request]:
        gone = [r for r in self.waiting + self.running if r.cancelled]
        self.waiting = [r for r in self.waiting if not r.cancelled]
        self.running = [r for r in self.running if not r.cancelled]
        return gone

    def _admit(self) -> None:
        self.waiting.sort(key=lambda r: r.order)
        while self.waiting and self.kv.admit(self.waiting[0]):
            self.running.append(self.waiting.pop(0))

    def _proposals(self, decodes: list[Request]) -> dict[int, list[int]]:
        if self.spec is None:
            return {}
        out = {}
        for r in decodes:
            guess = self.spec.propose(r.id, r.tokens, r.room(self.max_seq))
            if guess and r.constraint is not None:  # a token the grammar forbids is never verified
                guess = guess[: r.constraint.prefix(guess)]
            if guess:
                out[r.id] = guess
        return out

    def _chunks(self, budget: int) -> list[tuple[Request, int]]:
        chunks, computing = [], set()  # prefix blocks this step's chunks will complete
        for r in sorted((r for r in self.running if r.prefilling), key=lambda r: r.order):
            if not r.scores_prompt:  # a prompt whose logprobs are asked for is computed, not copied
                self.kv.reuse(r)
            first = self.kv.completes(r, r.fed + self.kv.block_size)[:1]
            if computing and first and first[0] in computing:
                continue  # another request computes this prefix right now: reuse it next step
            n = min(r.prompt_len - r.fed, budget)
            if n <= 0:
                break
            computing.update(self.kv.completes(r, r.fed + n))
            if not r.t_start:  # its first chunk: count what reuse saved
                self.kv.looked_up(r)
            chunks.append((r, n))
            budget -= n
        return chunks
