"""What a generation asks for and what it returns: GenerationConfig, Generation, Timing.

Plain dataclasses shared by the engine core, the Engine API and the server.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from compiler.runtime.grammar import GrammarSpec
from compiler.runtime.logprobs import TokenLogprob

ALIASES = {"max_tokens": "max_new_tokens"}  # the OpenAI and Triton names of a field


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's eos ids
    chat: bool = False
    grammar: GrammarSpec | None = None  # structured output: the tokens are constrained to it
    logprobs: int | None = None  # None: off; k: each new token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # None: off; k: the same for every prompt token after the first

    @classmethod
    def of(cls, base: "GenerationConfig | None" = None, **fields) -> "GenerationConfig":
        """The one conversion of a request into a config, for every driver (generate()'s keyword
        arguments, an HTTP body, a Triton request): `max_tokens` for max_new_tokens, `stop` as one
        string or a list, `ignore_eos=True` for no stop tokens; None leaves a field as it is in base.
        A field that is not a generation setting is refused by name."""
        if fields.pop("ignore_eos", False):
            fields["stop_token_ids"] = ()
        fields = {ALIASES.get(k, k): v for k, v in fields.items() if v is not None}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown generation setting {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if isinstance(fields.get("stop"), str):
            fields["stop"] = (fields["stop"],)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return dataclasses.replace(base or cls(), **fields)


@dataclass
class Timing:
    prompt_tokens: int = 0
    prefill_ms: float = 0.0
    decode_steps: int = 0  # tokens decoded after the first
    decode_s: float = 0.0
    proposed: int = 0  # speculative decoding: tokens proposed, and of them accepted
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        spec = (f" | speculative: {self.accepted}/{self.proposed} accepted ({100 * self.acceptance_rate:.0f}%)"
                if self.proposed else "")
        return (f"prefill {self.prompt_tokens} tok in {self.prefill_ms:.1f} ms | "
                f"decode {self.decode_steps} tok at {self.decode_tok_s:.1f} tok/s{spec}")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" (| "cancelled" | "error" inside the engine core)
    timing: Timing = field(default_factory=Timing)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first: None)
