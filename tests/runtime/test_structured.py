"""Structured outputs and logprobs in the engine core: constrained and unconstrained requests batched
together, in small prompt chunks with prefix reuse, give each request what it gets alone; a
proposal the grammar forbids is never verified; speculation under a grammar gives what plain
decoding gives; logprobs are the engine's log-softmax; a bad grammar is refused before a row is
taken. Tiny llama engines: ONNX Runtime's attention and kiln's kernel."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from compiler.runtime import load
from compiler.runtime.core import EngineCore, SchedulerConfig
from compiler.runtime.generation import GenerationConfig
from compiler.runtime.grammar import GrammarSpec
from compiler.runtime.logprobs import log_softmax
from compiler.runtime.speculative import SpeculativeConfig

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["word", "n", "ok"],
          "properties": {"word": {"type": "string", "maxLength": 10}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "ok": {"type": "boolean"}}}
JSON = GrammarSpec("json_schema", json.dumps(SCHEMA))
REQUESTS = [("The quick brown fox", JSON), ("Once upon a time, in a land far away, there lived", None),
            ("def f(x):", GrammarSpec("regex", "[a-z]{2,6}( [a-z]{2,6}){0,3}\\.")), ("The quick brown fox jumps", JSON)]


@pytest.fixture(scope="module", params=["contrib", "kiln"])
def engine(request, tiny_artifacts):
    return load(tiny_artifacts[("llama", request.param)])


def run(core: EngineCore, requests, **cfg) -> dict[int, object]:
    rids = [core.add_request(core.engine.text.encode(p), GenerationConfig(max_new_tokens=120, grammar=g, **cfg))
            for p, g in requests]
    got = {}
    while core.has_work:
        for o in core.step():
            if o.finished:
                assert o.error is None, o.error
                got[o.request_id] = o.generation
    return [got[r] for r in rids]


def alone(engine, prompt: str, grammar: GrammarSpec | None):
    return run(EngineCore(engine, SchedulerConfig(max_num_seqs=1)), [(prompt, grammar)])[0]


def test_batched_chunked_and_prefix_reused_answers_are_each_requests_own(engine):
    want = [alone(engine, p, g) for p, g in REQUESTS]
    for w, (_, g) in zip(want, REQUESTS):
        if g is JSON:
            assert w.finish_reason == "stop"
            jsonschema.validate(json.loads(w.text), SCHEMA)
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=5, prefix_cache_tokens=64,
                                              prefix_block_size=2))
    got = run(core, REQUESTS + REQUESTS[:1])  # the last shares the first's prompt blocks
    assert [g.token_ids for g in got] == [w.token_ids for w in want] + [want[0].token_ids]
    assert core.kv.usage().free_rows == 4 and core.kv.usage().blocks_used == 0


def test_a_forbidden_proposal_is_never_verified(engine, monkeypatch):
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=2, speculative=SpeculativeConfig(num_speculative=3)))
    bad = engine.text.encode("\n", add_special_tokens=False) * 3  # compact JSON has no raw newline anywhere
    verified = []
    monkeypatch.setattr(core.spec, "propose", lambda rid, tokens, room: list(bad))
    inner = core.runner._verify
    monkeypatch.setattr(core.runner, "_verify", lambda r, guess: verified.append(guess) or inner(r, guess))
    got = run(core, [REQUESTS[0]])[0]
    assert got.token_ids == alone(engine, *REQUESTS[0]).token_ids
    assert not verified  # every proposal was cut to nothing before verification


def test_speculation_under_a_grammar_answers_as_plain_decoding(engine):
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=4, speculative=SpeculativeConfig(method="ngram")))
    got = run(core, REQUESTS)
    assert [g.token_ids for g in got] == [alone(engine, p, g).token_ids for p, g in REQUESTS]
    assert core.stats["proposed"] > 0


def test_sampled_constrained_answers_are_valid_and_reproducible(engine):
    cfg = dict(temperature=1.0, top_p=0.9, seed=7)
    a = run(EngineCore(engine), [REQUESTS[0]] * 3, **cfg)
    b = run(EngineCore(engine), [REQUESTS[0]] * 3, **cfg)
    for g in a:
        jsonschema.validate(json.loads(g.text), SCHEMA)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_logprobs_are_the_log_softmax_of_the_logits(engine):
    ids = engine.text.encode("The quick brown fox")
    gen = run(EngineCore(engine), [("The quick brown fox", None)], logprobs=3, prompt_logprobs=2)[0]
    seq = ids + gen.token_ids
    s = engine.session
    logits = s.step(s.binding(s.new_cache(1)), np.array([seq]), np.arange(len(seq))[None], np.arange(len(seq))[None])[0]
    lp = log_softmax(logits)  # [T, V]
    assert np.allclose([x.logprob for x in gen.logprobs], lp[np.arange(len(ids) - 1, len(seq) - 1), gen.token_ids], atol=1e-4)
    assert gen.prompt_logprobs[0] is None and len(gen.prompt_logprobs) == len(ids)
    assert np.allclose([x.logprob for x in gen.prompt_logprobs[1:]], lp[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    first = gen.logprobs[0]
    assert len(first.top) == 3 and first.top[0][0] == int(lp[len(ids) - 1].argmax())


@pytest.mark.parametrize("spec,why", [
    (GrammarSpec("json_schema", '{"type": "strin"}'), "invalid JSON schema"),
    (GrammarSpec("json_schema", "{not json"), "cannot be read"),
    (GrammarSpec("regex", "([a-z"), "invalid regex"),
    (GrammarSpec("lark", "start: undefined_rule"), "invalid grammar"),
    (GrammarSpec("choice", "[]"), "non-empty list"),
])
def test_a_bad_grammar_is_refused_before_a_row(engine, spec, why):
    core = EngineCore(engine)
    with pytest.raises(ValueError, match=why):
        core.add_request(engine.text.encode("hi"), GenerationConfig(grammar=spec))
    assert not core.has_work and core.kv.usage().free_rows == core.kv.usage().rows
