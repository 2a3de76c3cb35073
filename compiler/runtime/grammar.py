"""Structured outputs: a grammar per sequence, turned into a token mask for the sampler (llguidance).

    grammars = Grammars(text, vocab=49152, eos=[2])
    grammars.check(GrammarSpec("json_schema", schema_json))   # ValueError naming the problem
    c = grammars.constraint(spec)                              # one per sequence
    c.fill()                  # the next token's mask (runs while the step's model call runs)
    c.apply(logits)           # logits [V]: tokens the grammar forbids -> -inf (a copy)
    c.accept(token)           # False: the token breaks the grammar
    c.prefix(proposal)        # how many proposed tokens the grammar accepts, from the first
    c.masks_along(tokens)     # the masks after each prefix of tokens (speculative verify)

llguidance (docs/decisions/structured-outputs.md) reads the engine's tokenizer.json itself, so
the runtime needs no transformers or torch; it is imported on first use, and a server without it
refuses structured requests by name with the install command.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np

from compiler.runtime.text import Text

KINDS = ("json_schema", "json_object", "regex", "lark", "choice")
JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a small model cannot loop on whitespace


@dataclass(frozen=True)
class GrammarSpec:
    kind: Literal["json_schema", "json_object", "regex", "lark", "choice"]
    source: str = ""  # the schema as JSON text | the regex | the Lark grammar | a JSON list of choices

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown grammar kind {self.kind!r}; known: {', '.join(KINDS)}")


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured outputs need llguidance: pip install 'kiln[serve]' (or pip install llguidance)") from None
    return llguidance


def grammar_text(spec: GrammarSpec) -> str:
    """llguidance's grammar for a spec (not yet checked against a tokenizer)."""
    m = _llguidance().LLMatcher
    if spec.kind in ("json_schema", "json_object"):
        schema = spec.source if spec.kind == "json_schema" else '{"type": "object"}'
        try:
            return m.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"the JSON schema cannot be read ({e})") from None
    if spec.kind == "regex":
        return m.grammar_from_regex(spec.source)
    if spec.kind == "lark":
        return m.grammar_from_lark(spec.source)
    choices = json.loads(spec.source)
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("choice needs a non-empty list of non-empty strings")
    return m.grammar_from_regex("|".join(f"({re.escape(c)})" for c in choices))


class Grammars:
    """The engine's tokenizer as llguidance sees it (built once, on first use), and checks."""

    def __init__(self, text: Text, vocab: int, eos: list[int]):
        self.text, self.vocab, self.eos = text, vocab, list(eos)
        self._tokenizer = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                ll = _llguidance()
                self._tokenizer = ll.LLTokenizer(self.text.tokenizer.to_str(), n_vocab=self.vocab,
                                                 eos_token=self.eos or None)
            return self._tokenizer

    def check(self, spec: GrammarSpec) -> str:
        """The grammar of spec, or ValueError saying what is wrong with it."""
        grammar = grammar_text(spec)
        error = _llguidance().LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            what = {"json_schema": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
                    "lark": "grammar", "choice": "choice list"}[spec.kind]
            raise ValueError(f"invalid {what}: {error.strip().splitlines()[0][:300]}")
        return grammar

    def constraint(self, spec: GrammarSpec) -> "Constraint":
        grammar = self.check(spec)
        return Constraint(_llguidance().LLMatcher(self.tokenizer, grammar), self.vocab)


class Constraint:
    """One sequence's grammar state and the mask of its next token."""

    def __init__(self, matcher, vocab: int):
        self.matcher, self.vocab = matcher, vocab
        self.bits = np.full((1, (vocab + 31) // 32), -1, dtype=np.int32)  # [1, ceil(V / 32)] one bit a token
        self._allowed: np.ndarray | None = None  # [V] bool of self.bits, unpacked by fill()

    def fill(self) -> None:
        """The next token's mask into self.bits, unpacked (runs beside the model call: llguidance and
        ONNX Runtime drop the GIL)."""
        row = self.bits[0]
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        self._allowed = self.allowed(row)

    def allowed(self, bits: np.ndarray | None = None) -> np.ndarray:
        """[V] bool: the tokens the mask lets through."""
        if bits is None and self._allowed is not None:
            return self._allowed
        b = self.bits[0] if bits is None else bits
        return np.unpackbits(b.view(np.uint8), bitorder="little")[: self.vocab].astype(bool)

    def apply(self, logits: np.ndarray, bits: np.ndarray | None = None) -> np.ndarray:
        """logits [V] -> a copy with forbidden tokens at -inf."""
        out = logits.copy()
        out[~self.allowed(bits)] = -np.inf
        return out

    def accept(self, token: int) -> bool:
        self._allowed = None  # the mask was for the token before this one
        return bool(self.matcher.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar has ended (it takes no more tokens)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    def prefix(self, tokens: list[int]) -> int:
        """How many of tokens, from the first, the grammar accepts now."""
        return int(self.matcher.validate_tokens([int(t) for t in tokens])) if tokens else 0

    def masks_along(self, tokens: list[int]) -> list[np.ndarray]:
        """The masks [ceil(V/32)] for the next token after each prefix tokens[:i], i = 0..len(tokens);
        the state is as before on return. tokens must be accepted (see prefix)."""
        out = []
        for i in range(len(tokens) + 1):
            self.fill()
            out.append(self.bits[0].copy())
            if i < len(tokens) and not self.accept(tokens[i]):
                raise ValueError(f"token {tokens[i]} breaks the grammar: {self.error}")
        if tokens:
            self.matcher.rollback(len(tokens))
        self._allowed = None
        return out
