"""The model runner: a step plan -> engine calls -> each request's new tokens.

It assembles the inputs of every call, calls the session, samples (or reads the tokens an engine
that samples in its graph returns) and verifies speculative proposals. It moves each request's
`fed` / `pending` as its tokens go into the KV row, and nothing else: the core decides what a
new token means (stop, finish, stream).

Calls: on a session that binds a span of rows, the decodes are one call over their rows and each
prompt chunk a call over its own row, positions continuing from its past, neighbouring calls
merged where one padded call costs less (`runtime/packing.py`); a session that binds every row
makes one call of everything. A row without work inside a bound span is fed a dummy token at its
next position, which that row's own next write overwrites. A speculating sequence is verified
in a call of its own row: its last token and k proposals, logits at every position.

Structured outputs and logprobs: the masks of a call's constrained rows are computed in a
thread while the call runs (llguidance drops the GIL, so does ONNX Runtime), applied to each
row's logits before it samples; a proposal is checked against the grammar before it is verified
and the target's logits at each proposed position get that position's mask. Logprobs are of the
raw logits. A request that wants its prompt's logprobs has each prompt chunk in a call of its own
that returns every position's logits. `_call` is where a per-row adapter index goes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from compiler.runtime.kv_manager import KVManager
from compiler.runtime.logprobs import TokenLogprob, token_logprob
from compiler.runtime.packing import Call, pack
from compiler.runtime.request import Request
from compiler.runtime.sampling import sample
from compiler.runtime.scheduler import StepPlan
from compiler.runtime.speculative import Speculator


@dataclass
class Fed:
    """What one request got from a step."""

    req: Request
    before: int  # tokens its row held before the step
    tokens: list[int]  # its new tokens, in order ([]: a prompt chunk that is not its last)
    proposed: int = 0  # speculative: proposals verified, and of them accepted
    accepted: int = 0
    error: Exception | None = None  # its call failed (the others go on)
    logprobs: list[TokenLogprob] | None = None  # one per token, when its request asks
    prompt_logprobs: list[TokenLogprob] | None = None  # of the prompt tokens this chunk predicted


class ModelRunner:
    def __init__(self, engine, kv: KVManager, spec: Speculator | None):
        self.session, self.cfg = engine.session, engine.config
        self.caps = self.session.capabilities
        self.kv, self.spec = kv, spec
        self._masks: ThreadPoolExecutor | None = None  # computes grammar masks beside the model call

    def execute(self, plan: StepPlan, running: list[Request]) -> list[Fed]:
        out = self._feed(plan.decodes, plan.chunks, running)
        for r in [r for r in running if r.id in plan.proposals]:
            out.append(self._verify(r, plan.proposals[r.id]))
        return out

    # -- decodes and prompt chunks ---------------------------------------------------------------
    def _feed(self, decodes: list[Request], chunks: list[tuple[Request, int]], running: list[Request]) -> list[Fed]:
        scored = [(r, n) for r, n in chunks if r.scores_prompt]
        chunks = [(r, n) for r, n in chunks if not r.scores_prompt]
        feeds = {r.row: (r, r.pending[:1]) for r in decodes}
        if self.caps.sliceable:  # the decodes and each prompt chunk, merged where one call costs less
            starts = dict.fromkeys(range(self.kv.rows.rows), 0)  # the position each row's next input goes to
            starts.update((r.row, r.fed) for r in running)
            calls = pack(([feeds] if feeds else []) + [{r.row: (r, r.pending[:n])} for r, n in chunks],
                         starts.get, self.cfg.max_seq, self.caps.multi_token_rows)
        else:  # every call binds every row anyway: one call for all
            calls = [{**feeds, **{r.row: (r, r.pending[:n]) for r, n in chunks}}]
        out = []
        for call in calls:
            try:
                results = self._call(call, running)
            except Exception as e:  # noqa: BLE001  (the requests of this call fail; the others go on)
                out += [Fed(r, r.fed, [], error=e) for r, _ in call.values()]
                continue
            for row, (r, tokens) in call.items():  # before the next call: its dummies write past these
                before = r.fed
                r.fed += len(tokens)
                r.pending = r.pending[len(tokens):]
                tok, lp = results.get(row, (None, None))
                out.append(Fed(r, before, [] if r.pending else [tok], logprobs=None if lp is None else [lp]))
        return out + [self._score(r, n) for r, n in scored]

    def _score(self, r: Request, n: int) -> Fed:
        """A prompt chunk of r alone, logits at every position: the logprobs of the prompt tokens it
        predicts, and r's first token when the chunk ends the prompt."""
        tokens, before = r.pending[:n], r.fed
        try:
            final = n == len(r.pending)
            masks = self._fill([r] if final and r.constraint is not None else [])
            io = self.kv.binding(r.row, r.row + 1)
            logits = self.session.step(io, np.asarray([tokens]), (before + np.arange(n))[None], np.arange(n)[None])[0]  # [n, V]
            if masks is not None:
                masks.result()
            k = r.config.prompt_logprobs
            scores = [token_logprob(logits[j], r.tokens[before + j + 1], k) for j in range(n) if before + j + 1 < r.prompt_len]
            first = self._sampled(r, logits[n - 1]) if final else None
        except Exception as e:  # noqa: BLE001  (this request fails; the others go on)
            return Fed(r, before, [], error=e)
        r.fed += n
        r.pending = r.pending[n:]
        tok, lp = first or (None, None)
        return Fed(r, before, [] if r.pending else [tok], logprobs=None if lp is None else [lp], prompt_logprobs=scores)

    def _call(self, call: Call, running: list[Request]) -> dict[int, int]:
        """One engine call over a row span; the next token of each row in `call` whose input is all in."""
        lo, hi = self.kv.span(min(call), max(call) + 1)
        S = max(len(t) for _, t in call.values())
        pad, M = self.cfg.generation.pad_token_id, self.cfg.max_seq
        by_row = {r.row: r for r in running}
        ids = np.full((hi - lo, S), pad, dtype=np.int64)  # [B, S]
        pos = np.zeros((hi - lo, S), dtype=np.int64)  # [B, S]
        at = np.zeros((hi - lo, 1), dtype=np.int64)  # [B, 1]: each row's last real column
        for b in range(hi - lo):
            r, tokens = call.get(lo + b) or (by_row.get(lo + b), [])
            start = r.fed if r is not None else 0  # a row without work: a dummy at its next position
            ids[b, : len(tokens)] = tokens
            pos[b] = np.minimum(start + np.arange(S), M - 1)
            at[b, 0] = max(len(tokens) - 1, 0)
        io = self.kv.binding(lo, hi)
        if self.caps.samples:
            toks = self.session.step(io, ids, pos, at, self._sampling_inputs(call, lo, hi))  # [B]
            return {row: (int(toks[row - lo]), None) for row in call}
        final = {row: r for row, (r, tokens) in call.items() if len(tokens) == len(r.pending)}  # a non-final chunk: unused
        masks = self._fill([r for r in final.values() if r.constraint is not None])
        logits = self.session.step(io, ids, pos, at)[:, 0]  # [B, V]
        if masks is not None:
            masks.result()
        return {row: self._sampled(r, logits[row - lo]) for row, r in final.items()}

    def _fill(self, constrained: list[Request]):
        """Start computing the constrained rows' masks in the mask thread (a future), or None."""
        if not constrained:
            return None
        if self._masks is None:
            self._masks = ThreadPoolExecutor(1, thread_name_prefix="kiln-grammar")
        return self._masks.submit(lambda: [r.constraint.fill() for r in constrained])

    def _sampled(self, r: Request, row: np.ndarray, bits: np.ndarray | None = None) -> tuple[int, TokenLogprob | None]:
        """r's next token from its logits [V] (under its grammar's current mask, or `bits`), and its
        logprob when r asks for them."""
        masked = row if r.constraint is None else r.constraint.apply(row, bits)
        tok = int(sample(masked[None], r.params, r.rng)[0])
        k = r.config.logprobs
        return tok, None if k is None else token_logprob(row, tok, k)

    def _sampling_inputs(self, call: Call, lo: int, hi: int) -> dict:
        """kiln::Sample's per-row inputs; a row draws from its own generator only when it samples."""
        B = hi - lo
        t, k, p, u = np.zeros(B, np.float32), np.zeros(B, np.int64), np.ones(B, np.float32), np.zeros(B, np.float32)
        for row, (r, tokens) in call.items():
            b = row - lo
            t[b], k[b], p[b] = r.params.temperature, r.params.top_k, r.params.top_p
            if len(tokens) == len(r.pending) and not r.params.greedy:
                u[b] = r.rng.random()
        return {"temperature": t, "top_k": k, "top_p": p, "draws": u}

    # -- speculative decoding (runtime/speculative.py) -------------------------------------------
    def _verify(self, r: Request, guess: list[int]) -> Fed:
        """Feed the last token and the proposals in one call of r's row alone; keep what the
        target accepts and its own next token (the rest of the row lies past r's length)."""
        tokens, fed = r.pending[:1] + guess, r.fed
        try:
            io = self.kv.binding(r.row, r.row + 1)
            logits = self.session.step(io, np.asarray([tokens]), (fed + np.arange(len(tokens)))[None],
                                       np.arange(len(tokens))[None])[0]  # [k + 1, V]
        except Exception as e:  # noqa: BLE001  (this request fails; the others go on)
            return Fed(r, fed, [], error=e)
        raw = logits
        if r.constraint is not None:  # each position's target under the grammar's state there
            logits = np.stack([r.constraint.apply(logits[i], bits) for i, bits in enumerate(r.constraint.masks_along(guess))])
        n, nxt = self.spec.verify(r.id, guess, logits, r.params, r.rng, fed + 1)
        r.fed = fed + 1 + n
        tokens = guess[:n] + [nxt]
        k = r.config.logprobs
        lps = None if k is None else [token_logprob(raw[i], t, k) for i, t in enumerate(tokens)]
        return Fed(r, fed, tokens, len(guess), n, logprobs=lps)
