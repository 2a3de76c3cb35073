"""Speculative decoding for the engine core: propose k tokens, verify them in one target step.

A proposer guesses how a sequence goes on: prompt lookup (the continuation of the latest earlier
match of its last n-gram, in the prompt or the text so far; no second model) or a draft engine
(any artifact with the same tokenizer, greedy, with KV rows of its own). The core then feeds the
sequence's last token and the k proposals in one step (S = k + 1, logits at every position):
a step of a few tokens costs about what one token costs while reading the weights dominates.

Verification keeps the longest run of proposals the target accepts, then one token of the
target's own. Greedy: a proposal is accepted when it is the target's argmax, so the output is
token for token the plain output. Sampling: the proposals are deterministic (q is one-hot), so
the rule of Leviathan et al. 2023 / Chen et al. 2023 reads: accept x with probability p(x);
on a rejection draw from p with x removed and renormalised; after k acceptances draw from the
last position's p. The output distribution is the target's. KV entries of rejected tokens stay
past the sequence's length, never read, overwritten by the next step.

The number of proposals adapts per sequence: it grows while all are accepted, shrinks to what
was accepted, and after repeated failures pauses proposing for a while, so free text is not
slowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.runtime.sampling import SamplingParams, distribution, draw_index

METHODS = ("ngram", "draft")
_PAUSE_STEPS = 16  # the longest back-off, in steps without proposals


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"  # "ngram" (prompt lookup) | "draft"
    num_speculative: int | None = None  # proposals a step; None: adaptive, 1..max_speculative
    max_speculative: int = 16
    draft: str | None = None  # the draft artifact's directory (method "draft")
    ngram_max: int = 3  # the longest n-gram looked up, then shorter ones
    ngram_min: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "draft" and not self.draft:
            raise ValueError("speculative method 'draft' needs a draft artifact (--draft ART)")
        if self.method != "draft" and self.draft:
            raise ValueError("a draft artifact is only used with speculative method 'draft'")
        if self.num_speculative is not None and not 1 <= self.num_speculative <= 32:
            raise ValueError(f"num_speculative must be 1..32, got {self.num_speculative}")
        if not 1 <= self.max_speculative <= 32:
            raise ValueError(f"max_speculative must be 1..32, got {self.max_speculative}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max")


class AdaptiveK:
    """How many tokens one sequence proposes next: grows while all are accepted, shrinks to
    what was accepted, and after misses at one token pauses for 1, 2, 4 ... steps (at most
    _PAUSE_STEPS), so text the proposer cannot guess costs few failed steps."""

    def __init__(self, cfg: SpeculativeConfig):
        self.fixed = cfg.num_speculative
        self.most = cfg.max_speculative
        self.k = self.fixed or min(4, self.most)
        self.pause = 0
        self.misses = 0  # failed proposals in a row at k = 1

    def next(self) -> int:
        if self.fixed:
            return self.fixed
        if self.pause:
            self.pause -= 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        if self.fixed or not proposed:
            return
        if accepted:
            self.misses = 0
        if accepted == proposed:
            self.k = min(self.k + 2, self.most)
        elif accepted == 0 and self.k == 1:
            self.misses += 1
            self.pause = min(2 ** (self.misses - 1), _PAUSE_STEPS)
        else:
            self.k = max(accepted, 1)


def ngram_propose(tokens: list[int], k: int, n_max: int = 3, n_min: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens
    (n from n_max down to n_min); [] when nothing matches."""
    if k < 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, len(arr) - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # [len - n, n]: every earlier n-gram
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []


def verify_greedy(proposal: list[int], logits: np.ndarray) -> tuple[int, int]:
    """logits [k + 1, V] at the last token and each proposal -> (proposals accepted, the next token)."""
    targets = logits.argmax(axis=-1)
    n = 0
    while n < len(proposal) and proposal[n] == targets[n]:
        n += 1
    return n, int(targets[n])


def verify_sampled(proposal: list[int], logits: np.ndarray, params: SamplingParams,
                   rng: np.random.Generator) -> tuple[int, int]:
    """Accept/reject with a one-hot proposal distribution; the result is distributed as the target."""
    for i, x in enumerate(proposal):
        p = distribution(logits[i], params)
        if rng.random() < p[x]:
            continue
        p[x] = 0.0
        return i, draw_index(p / p.sum(), rng.random())
    return len(proposal), draw_index(distribution(logits[len(proposal)], params), rng.random())


class Speculator:
    """The core's proposer and verifier: per sequence an AdaptiveK, the proposals of the
    configured method, their verification, and what was proposed and accepted."""

    def __init__(self, engine, cfg: SpeculativeConfig, rows: int):
        self.cfg = cfg
        self.adapt: dict[int, AdaptiveK] = {}
        self.draft = None
        if cfg.method == "draft":
            from compiler.runtime.draft import DraftProposer

            self.draft = DraftProposer(engine, cfg.draft, rows, engine.session.threads)

    def propose(self, request_id: int, tokens: list[int], room: int) -> list[int]:
        """Proposals after `tokens` (the sequence, its pending last token included); room: how
        many the sequence may still take (its token limit, the cache)."""
        k = min(self.adapt.setdefault(request_id, AdaptiveK(self.cfg)).next(), room)
        if k < 1:
            return []
        if self.draft is not None:
            return self.draft.propose(request_id, tokens, k)
        return ngram_propose(tokens, k, self.cfg.ngram_max, self.cfg.ngram_min)

    def prefill(self, request_id: int, tokens: list[int]) -> None:
        """The target has read `tokens` of a prompt: a draft reads them too, inside the prefill
        (so its first proposal does not wait on the whole prompt, and TTFT shows its cost)."""
        if self.draft is not None:
            self.draft.feed(request_id, tokens)

    def verify(self, request_id: int, proposal: list[int], logits: np.ndarray, params: SamplingParams,
               rng: np.random.Generator, kept: int) -> tuple[int, int]:
        """(accepted, next token) for logits [k + 1, V]; kept: the tokens the target's cache
        then holds (the draft rolls back to them)."""
        n, nxt = (verify_greedy(proposal, logits) if params.greedy
                  else verify_sampled(proposal, logits, params, rng))
        self.adapt.setdefault(request_id, AdaptiveK(self.cfg)).update(len(proposal), n)
        if self.draft is not None:
            self.draft.rollback(request_id, kept + n)
        return n, nxt

    def release(self, request_id: int) -> None:
        self.adapt.pop(request_id, None)
        if self.draft is not None:
            self.draft.release(request_id)


@dataclass(frozen=True)
class Draft:
    """generate(..., speculate=Draft("artifacts/smollm2-135m-int4")): a draft engine proposes."""

    path: str
    num_speculative: int | None = None


def resolve(speculate, engine, num_speculative: int | None = None) -> SpeculativeConfig | None:
    """What a caller asked for, over the engine's default (its recipe's `speculative:`):
    None (the default), "off", "ngram", "draft" (the default's draft), Draft(path) or a
    SpeculativeConfig; num_speculative overrides k. A draft given by name is looked up beside
    the engine's artifact when it is not a path from here."""
    base = dict(engine.config.speculative or {})
    if isinstance(speculate, SpeculativeConfig):
        cfg = speculate
    elif speculate is None:
        if not base:
            if num_speculative is not None:
                raise ValueError("--num-speculative needs --speculate ngram|draft (this engine has no speculative default)")
            return None
        cfg = SpeculativeConfig(**base)
    elif speculate in ("off", False):
        return None
    elif speculate == "ngram":
        cfg = SpeculativeConfig(**{**base, "method": "ngram", "draft": None})
    elif speculate == "draft":
        if base.get("method") != "draft":
            raise ValueError("--speculate draft needs --draft ARTIFACT (this engine's recipe names no draft)")
        cfg = SpeculativeConfig(**base)
    elif isinstance(speculate, Draft):
        cfg = SpeculativeConfig(**{**base, "method": "draft", "draft": str(speculate.path),
                                   "num_speculative": speculate.num_speculative or base.get("num_speculative")})
    else:
        raise ValueError(f"speculate must be 'ngram', 'draft', 'off', Draft(path) or a SpeculativeConfig, got {speculate!r}")
    if num_speculative is not None:
        cfg = dataclasses.replace(cfg, num_speculative=num_speculative)
    if cfg.draft is not None:
        cfg = dataclasses.replace(cfg, draft=str(_draft_path(cfg.draft, engine.path)))
    return cfg


def _draft_path(draft: str, engine_path: Path) -> Path:
    here = Path(draft)
    if here.is_dir() or here.is_absolute():
        found = here
    else:
        found = Path(engine_path).resolve().parent / draft  # a sibling artifact
    if not (found / "engine.json").is_file():
        raise ValueError(f"draft {draft}: no kiln artifact there (looked in {found}); build it or give its path")
    return found
