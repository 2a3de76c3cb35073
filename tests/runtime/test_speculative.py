"""Speculative decoding in the engine core: prompt lookup and draft engines give the plain greedy
output token for token (batch 1 and 3, chunked prefill and prefix reuse on), sampling keeps the
target's distribution, rejected tokens leave no stale KV, and the number of proposals adapts."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from compiler.runtime import Draft, load
from compiler.runtime.core import EngineCore, SchedulerConfig
from compiler.runtime.generation import GenerationConfig
from compiler.runtime.sampling import SamplingParams, distribution
from compiler.runtime.speculative import AdaptiveK, SpeculativeConfig, ngram_propose, verify_greedy, verify_sampled
from tests.conftest import build_artifact, make_tiny
from tests.runtime import fake_session
from tests.runtime.test_core import PROMPTS, drain, reference

N = 24
LOOPY = "one two three one two three one two three one two"


def test_ngram_proposes_the_continuation_of_the_latest_match():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2], 3) == [3, 7, 1]  # the latest "1 2" is followed by 3 7 ...
    assert ngram_propose([5, 6, 7, 5], 2) == [6, 7]  # falls back to a 1-gram
    assert ngram_propose([1, 2, 3], 4) == [] and ngram_propose([4], 2) == [] and ngram_propose([1, 1], 0) == []


def test_adaptive_k_grows_shrinks_and_backs_off():
    a = AdaptiveK(SpeculativeConfig(max_speculative=8))
    assert a.next() == 4
    a.update(4, 4)
    assert a.next() == 6
    a.update(6, 2)
    assert a.next() == 2
    a.update(2, 0)
    assert a.next() == 1
    pauses = []
    for _ in range(7):  # misses at one token: pauses of 1, 2, 4, ... steps, at most 16
        a.update(1, 0)
        n = 0
        while a.next() == 0:
            n += 1
        pauses.append(n)
    assert pauses == [1, 2, 4, 8, 16, 16, 16]
    a.update(1, 1)  # an acceptance resets the back-off
    a.update(3, 0)
    assert a.next() == 1
    a.update(1, 0)
    assert [a.next(), a.next()] == [0, 1]
    fixed = AdaptiveK(SpeculativeConfig(num_speculative=3))
    fixed.update(3, 0)
    assert fixed.next() == 3


@pytest.mark.parametrize("kw, why", [({"method": "medusa"}, "method must be one of ngram, draft"),
                                     ({"method": "draft"}, "needs a draft artifact"),
                                     ({"draft": "x"}, "only used with speculative method 'draft'"),
                                     ({"num_speculative": 0}, "num_speculative must be 1..32"),
                                     ({"max_speculative": 33}, "max_speculative must be 1..32"),
                                     ({"ngram_min": 4}, "ngram_min <= ngram_max")])
def test_bad_speculative_settings_are_refused(kw, why):
    with pytest.raises(ValueError, match=why):
        SpeculativeConfig(**kw)


def test_greedy_verification_keeps_the_agreeing_prefix():
    logits = np.eye(6)[[3, 4, 5, 1]]  # the target says 3, 4, 5, then 1
    assert verify_greedy([3, 4, 0], logits) == (2, 5)
    assert verify_greedy([3, 4, 5], logits) == (3, 1)
    assert verify_greedy([0, 4, 5], logits) == (0, 3)


def test_sampled_verification_keeps_the_target_distribution():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6)) * 2
    params = SamplingParams(temperature=0.8, top_k=5)
    p = distribution(logits[0], params)
    for proposal in (int(p.argmax()), int(p.argmin())):  # a likely and an impossible proposal
        draws = rng.integers(0, 2**32, 1)
        gen = np.random.default_rng(draws[0])
        firsts = [[proposal, None][n == 0] if n else tok for n, tok in
                  (verify_sampled([proposal], logits, params, gen) for _ in range(20000))]
        freq = np.bincount(firsts, minlength=6) / len(firsts)
        assert np.abs(freq - p).max() < 0.015, (proposal, freq, p)


@pytest.fixture(scope="module", params=["contrib", "standard", "kiln-int8"])
def engine(request, tiny_artifacts):
    return load(tiny_artifacts[("llama", request.param)])


def _run(engine, prompts, spec, **sched):
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=4, speculative=spec, **sched))
    rids = [core.add_request(engine.text.prompt_ids(p, False), GenerationConfig(max_new_tokens=N)) for p in prompts]
    got = drain(core)
    assert core.kv.free_rows == core.kv.rows.rows and core.kv.blocks.used == 0
    return [got[r] for r in rids], core


@pytest.mark.parametrize("batch", [1, 3])
def test_prompt_lookup_gives_the_plain_greedy_output(engine, batch):
    prompts = [LOOPY, *PROMPTS][:batch]
    refs = [reference(engine, engine.text.prompt_ids(p, False), N) for p in prompts]
    got, core = _run(engine, prompts, SpeculativeConfig(), max_num_batched_tokens=5, prefix_cache_tokens=256,
                     prefix_block_size=4)
    assert got == refs
    assert core.stats["proposed"] >= core.stats["accepted"] > 0  # it guessed some tokens right, and they count


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """A tiny llama with other weights and the same tokenizer: it proposes wrong tokens often."""
    root = tmp_path_factory.mktemp("draft")
    return build_artifact(make_tiny("llama", root / "ckpt", seed=1), root, "draft")


@pytest.mark.parametrize("batch", [1, 3])
def test_a_draft_engine_gives_the_plain_greedy_output(engine, tiny_artifacts, other_draft, batch):
    prompts = [LOOPY, *PROMPTS][:batch]
    refs = [reference(engine, engine.text.prompt_ids(p, False), N) for p in prompts]
    same = SpeculativeConfig(method="draft", draft=str(tiny_artifacts[("llama", "contrib")]), num_speculative=4)
    got, core = _run(engine, prompts, same, max_num_batched_tokens=7)
    assert got == refs and core.stats["accepted"] == core.stats["proposed"] > 0  # the same weights agree
    other = SpeculativeConfig(method="draft", draft=str(other_draft), num_speculative=4)
    got, core = _run(engine, prompts, other, max_num_batched_tokens=7, prefix_cache_tokens=256, prefix_block_size=4)
    assert got == refs and core.stats["accepted"] < core.stats["proposed"]  # rejections roll back exactly


def test_a_draft_reads_the_prompt_during_the_prefill(engine, tiny_artifacts):
    """The draft is fed each prompt chunk as the target reads it (its cost is in TTFT, not in the
    decode), so by the first token it holds the whole prompt and its first proposal reads one token."""
    same = SpeculativeConfig(method="draft", draft=str(tiny_artifacts[("llama", "contrib")]), num_speculative=4)
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=2, speculative=same, max_num_batched_tokens=5))
    ids = [engine.text.prompt_ids(p, False) for p in PROMPTS[:2]]
    rids = [core.add_request(x, GenerationConfig(max_new_tokens=N)) for x in ids]
    draft, seen = core.spec.draft, {}
    while len(seen) < 2:
        core.step()
        for r in core.scheduler.running:
            if r.gen.token_ids and r.id not in seen:  # the step that gave its first token
                assert len(r.gen.token_ids) == 1
                seen[r.id] = draft.seqs[r.id][1]
    assert seen == {rid: len(x) for rid, x in zip(rids, ids)}
    fed = []
    draft._next = (lambda orig: lambda io, chunk, start: fed.append(len(chunk)) or orig(io, chunk, start))(draft._next)
    core.step()
    assert fed[0] == 1  # the first proposal reads only the first generated token
    drain(core)
    assert not draft.seqs and draft.rows.free == draft.rows.rows


def test_rejected_proposals_leave_no_stale_kv(engine):
    """A step that proposes garbage, then a continuation: the same as never proposing."""
    ids = engine.text.prompt_ids(PROMPTS[1], False)
    ref = reference(engine, ids, N)
    core = EngineCore(engine, SchedulerConfig(max_num_seqs=1, speculative=SpeculativeConfig(num_speculative=6)))
    core.spec.propose = lambda rid, tokens, room: [(t + 7) % engine.config.vocab_size for t in tokens[-min(6, room):]]
    rid = core.add_request(ids, GenerationConfig(max_new_tokens=N))
    assert drain(core)[rid] == ref
    assert core.stats["proposed"] > core.stats["accepted"]


def test_a_draft_with_another_tokenizer_is_refused(engine, tiny_artifacts, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_artifacts[("llama", "contrib")], other)
    tok = other / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|im_end|>"', '"<|end|>"'))
    manifest = json.loads((other / "kiln.json").read_text())  # re-listed: a consistent artifact, another tokenizer
    manifest["files"]["tokenizer.json"] = hashlib.sha256(tok.read_bytes()).hexdigest()
    manifest["sizes"]["tokenizer.json"] = tok.stat().st_size
    (other / "kiln.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another tokenizer"):
        EngineCore(engine, SchedulerConfig(speculative=SpeculativeConfig(method="draft", draft=str(other))))


def test_the_recipe_section_is_the_default_of_generate_run_and_the_card(tiny_checkpoints, tmp_path, capsys):
    from compiler.cli import main
    from compiler.errors import KilnError

    art = build_artifact(tiny_checkpoints["llama"], tmp_path, "spec", speculative={"method": "ngram", "num_speculative": 3})
    assert "speculative decoding by default: prompt lookup" in (art / "README.md").read_text()
    engine = load(art)
    on, off = engine.generate(LOOPY, max_new_tokens=N), engine.generate(LOOPY, max_new_tokens=N, speculate="off")
    assert on.token_ids == off.token_ids and on.timing.accepted > 0 and off.timing.proposed == 0
    assert main(["run", str(art), "--prompt", LOOPY, "--max-new-tokens", str(N), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == on.token_ids and out["proposed"] >= out["accepted"] > 0
    assert out["acceptance_rate"] == pytest.approx(out["accepted"] / out["proposed"], abs=1e-3)
    with pytest.raises(KilnError, match="speculative"):
        build_artifact(tiny_checkpoints["llama"], tmp_path, "bad", speculative={"method": "draft"})


def test_sampled_speculation_keeps_the_token_frequencies(engine):
    """Many seeds: the token after the first follows the same distribution with and without
    speculation (proposals forced, so accept/reject runs every step), compared given the first
    token (top-k 4 keeps each conditional distribution small)."""
    ids = engine.text.prompt_ids(LOOPY, False)
    seeds = 2000

    def samples(spec) -> np.ndarray:
        core = EngineCore(engine, SchedulerConfig(max_num_seqs=64, speculative=spec))
        if spec is not None:
            core.spec.propose = lambda rid, tokens, room: [tokens[-1]]
        rids = [core.add_request(ids, GenerationConfig(max_new_tokens=2, temperature=1.2, top_k=4, seed=s, stop_token_ids=()))
                for s in range(seeds)]
        got = drain(core)
        assert spec is None or core.stats["proposed"] == seeds
        return np.array([got[r] for r in rids])  # [seeds, 2]

    plain, spec = samples(None), samples(SpeculativeConfig(num_speculative=1))
    V = engine.config.vocab_size
    firsts = np.bincount(plain[:, 0], minlength=V)
    for v in np.argsort(-firsts)[:2]:  # the two commonest first tokens
        a = np.bincount(plain[plain[:, 0] == v, 1], minlength=V) / max((plain[:, 0] == v).sum(), 1)
        b = np.bincount(spec[spec[:, 0] == v, 1], minlength=V) / max((spec[:, 0] == v).sum(), 1)
        assert 0.5 * np.abs(a - b).sum() < 0.1, (v, a[a > 0], b[b > 0])


def test_prompt_lookup_on_smollm2_gives_the_plain_output(tmp_path):
    from tests.conftest import SMOLLM2_DIR

    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip("the SmolLM2 checkpoint is not there: make model")
    art = build_artifact(SMOLLM2_DIR, tmp_path, "smol", max_seq=512, max_batch=2)
    engine = load(art)
    text = "The river runs through the old town, past the mill and under the stone bridge. " * 3
    prompts = [text + "Once more:", "def add(a, b):\n    return a + b\n\ndef"]
    plain = engine.generate(prompts, max_new_tokens=40, speculate="off")
    fast = engine.generate(prompts, max_new_tokens=40, speculate="ngram")
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert sum(g.timing.accepted for g in fast) > 10
    draft = engine.generate(prompts[0], max_new_tokens=40, speculate=Draft(str(art), num_speculative=4))  # itself
    assert draft.token_ids == plain[0].token_ids and draft.timing.accepted == draft.timing.proposed > 0


# -- on the fake session (tests/runtime/fake_session.py): its output hashes its whole KV row ------
FAKE_PROMPTS = ["a b c d e f g h", "one two three four five six seven eight nine ten eleven twelve", "x"]


@pytest.mark.parametrize("multi_token_rows", [True, False])
def test_proposals_are_verified_exactly_on_a_fake_session(multi_token_rows):
    """Right proposals are all accepted, wrong ones all rejected, and either way the output is
    the model's own; a rejected token's KV is never read back (the fake would hash it in)."""
    engine = fake_session.FakeEngine(multi_token_rows=multi_token_rows)
    prompts = [engine.text.prompt_ids(p) for p in FAKE_PROMPTS]
    refs = [fake_session.reference(p, N) for p in prompts]
    truth = {tuple(p + r[:i]): r[i:] for p, r in zip(prompts, refs) for i in range(len(r))}

    for name, guess in (("right", lambda tokens, k: truth[tuple(tokens)][:k]),
                        ("wrong", lambda tokens, k: [(t % 49) + 1 for t in truth[tuple(tokens)][:k]])):
        core = EngineCore(engine, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=4,
                                                  speculative=SpeculativeConfig(num_speculative=3)))
        core.spec.propose = lambda rid, tokens, room, g=guess: g(tokens, min(3, room))
        rids = [core.add_request(p, GenerationConfig(max_new_tokens=N)) for p in prompts]
        got = drain(core)
        assert [got[r] for r in rids] == refs, name
        s = core.stats
        assert s["proposed"] > 0 and s["accepted"] == (s["proposed"] if name == "right" else 0), (name, s)
        assert core.kv.free_rows == core.kv.rows.rows


def test_a_session_that_cannot_give_every_position_is_refused_for_speculation():
    engine = fake_session.FakeEngine(logits_at_every_position=False)
    with pytest.raises(ValueError, match="speculative decoding runs on CPU"):
        EngineCore(engine, SchedulerConfig(speculative=SpeculativeConfig()))
