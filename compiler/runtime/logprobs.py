"""Log-probabilities of tokens, as OpenAI's `logprobs` / `top_logprobs` and completions' `echo`
report them: log-softmax of the engine's logits (before temperature, top-k/p or a grammar's
mask), the chosen token's value and the k most likely tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP = 20  # OpenAI's bound on top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the k most likely tokens and their log-probabilities, best first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[..., V] -> [..., V] float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """logits [V] of one position; token: the one that follows; top: how many alternatives."""
    lp = log_softmax(logits)
    best = np.argsort(-lp, kind="stable")[:top] if top else []
    return TokenLogprob(int(token), float(lp[token]), tuple((int(t), float(lp[t])) for t in best))
