"""A draft engine that proposes tokens for speculative decoding (`runtime/speculative.py`).

Any kiln artifact whose tokenizer is the target's can draft, for example the int4 build of the
model drafting for its fp32 build. It keeps one KV row per sequence, in step with the target:
before proposing it is fed what it has not seen of the sequence (the target's accepted tokens
since its last proposal), then it decodes k tokens greedily. After verification it rolls back
to the tokens the target kept; entries past that are never read and get overwritten.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.runtime.config import EngineConfig
from compiler.runtime.hashing import sha256_file
from compiler.runtime.rows import RowPool
from compiler.runtime.verify import verify_artifact

PREFILL_CHUNK = 512  # prompt tokens the draft reads per call


def _tokenizer_digest(path: Path) -> str:
    return sha256_file(path / "tokenizer.json")


class DraftProposer:
    def __init__(self, target, path: str | Path, rows: int, threads: int | None = None):
        path = Path(path)
        verify_artifact(path)  # as load() does
        if EngineConfig.load(path / "engine.json").task != "generate":
            raise ValueError(f"draft {path} is not a text generator")
        # an engine of the target's class; its threads stop spinning when a step ends (two spinning
        # pools on the same cores slow each other down)
        self.engine = type(target)(path, threads=threads, config_entries={"session.force_spinning_stop": "1"})
        if (self.engine.config.vocab_size != target.config.vocab_size
                or _tokenizer_digest(path) != _tokenizer_digest(target.path)):
            raise ValueError(f"draft {path} has another tokenizer than the target {target.path}; a draft must share it "
                             f"(for example an int4 build of the same checkpoint)")
        if not self.engine.session.capabilities.sliceable:
            raise ValueError(f"draft {path} runs on {self.engine.config.session.execution_provider}; drafts run on CPU engines")
        self.rows = RowPool(self.engine.session, rows)
        self.seqs: dict[int, list[int]] = {}  # request id -> [row, tokens fed]
        self.max_seq = self.engine.config.max_seq

    def _state(self, request_id: int) -> list[int] | None:
        """[row, tokens fed] of a sequence; a row is taken at its first use (None: none is free)."""
        state = self.seqs.get(request_id)
        if state is None:
            row = self.rows.acquire()
            if row is None:
                return None
            state = self.seqs[request_id] = [row, 0]
        return state

    def feed(self, request_id: int, tokens: list[int]) -> None:
        """Prefill the draft with what it has not seen of `tokens` (the target's prompt so far),
        in chunks of at most PREFILL_CHUNK, so its first proposal has only the last token to read."""
        if len(tokens) >= self.max_seq:  # longer than the draft's cache: it will not propose for it
            return
        state = self._state(request_id)
        if state is None:
            return
        row, fed = state
        io = self.rows.binding(row, row + 1)
        for start in range(fed, len(tokens), PREFILL_CHUNK):
            chunk = tokens[start:start + PREFILL_CHUNK]
            self.engine.session.step(io, np.asarray([chunk], dtype=np.int64), (start + np.arange(len(chunk)))[None])
        state[1] = max(fed, len(tokens))

    def propose(self, request_id: int, tokens: list[int], k: int) -> list[int]:
        """Up to k greedy draft tokens after `tokens` (the sequence so far, its last token included)."""
        state = self._state(request_id)
        if state is None:
            return []
        row, fed = state
        k = min(k, self.max_seq - len(tokens))
        if k < 1:
            return []
        io = self.rows.binding(row, row + 1)
        chunk = tokens[fed:]  # what the draft has not seen, the last token at least
        out = [self._next(io, chunk, fed)]
        fed = len(tokens)
        for _ in range(k - 1):
            out.append(self._next(io, out[-1:], fed))
            fed += 1
        state[1] = fed
        return out

    def _next(self, io, chunk: list[int], start: int) -> int:
        ids = np.asarray([chunk], dtype=np.int64)
        pos = (start + np.arange(len(chunk), dtype=np.int64))[None]
        return int(self.engine.session.step(io, ids, pos)[0, -1].argmax())

    def rollback(self, request_id: int, keep: int) -> None:
        """The target kept `keep` tokens of the sequence in its cache: forget the draft's rest."""
        state = self.seqs.get(request_id)
        if state is not None:
            state[1] = min(state[1], keep)

    def release(self, request_id: int) -> None:
        state = self.seqs.pop(request_id, None)
        if state is not None:
            self.rows.release(state[0])
