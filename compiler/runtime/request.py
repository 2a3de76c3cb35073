"""A request inside the engine core, and what a step hands back for it.

A `Request` is one sequence: its tokens, how far its KV row holds them (`fed`), what it still
has to feed (`pending`), its sampler and its stream of text. The scheduler moves it between
waiting and running, the KV manager gives it a row, the model runner feeds it, and the core
turns each new token into a `StepOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compiler.runtime.generation import Generation, GenerationConfig
from compiler.runtime.grammar import Constraint
from compiler.runtime.logprobs import TokenLogprob
from compiler.runtime.sampling import SamplingParams
from compiler.runtime.text import TextStream


@dataclass
class StepOutput:
    request_id: int
    text: str = ""  # text that became final in this step
    finished: bool = False
    generation: Generation | None = None  # set when finished (finish_reason stop | length | cancelled | error)
    error: Exception | None = None  # the engine failed on this request
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens this step added (when asked for)


@dataclass(eq=False)
class Request:
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
    constraint: Constraint | None = None  # its grammar (structured output)

    @property
    def scores_prompt(self) -> bool:
        """Its prompt chunks need logits at every position (prompt logprobs)."""
        return self.config.prompt_logprobs is not None

    @property
    def prefilling(self) -> bool:
        return self.fed < self.prompt_len

    @property
    def order(self) -> tuple[int, int]:
        """Who goes first: lower priority values, then arrival."""
        return self.priority, self.id

    def room(self, max_seq: int) -> int:
        """Proposals it may take after its pending token: its token limit, and the cache."""
        return min(self.limit - len(self.gen.token_ids) - 1, max_seq - 1 - self.fed)
