"""One RuntimeSettings owner and one request -> GenerationConfig conversion: each setting from the
first place that gives it (flag, tuned record, the recipe's serve section, kiln's default), bad
names and values refused by name, and the same core for every driver."""

from __future__ import annotations

import json
import shutil

import pytest

from compiler.runtime import Draft, load
from compiler.runtime.generation import GenerationConfig
from compiler.runtime.manifest import read_manifest, write_manifest
from compiler.runtime.settings import RuntimeSettings
from tests.conftest import build_artifact


@pytest.fixture(scope="module")
def served(tiny_checkpoints, tmp_path_factory):
    """A tiny artifact whose recipe sets serve: defaults and speculative: ngram, tuned for "chat"."""
    root = tmp_path_factory.mktemp("settings")
    art = build_artifact(tiny_checkpoints["llama"], root, "served", serve={"max_num_batched_tokens": 64, "threads": 1},
                         speculative={"method": "ngram", "num_speculative": 2})
    tuned = {"serve": {"max_num_seqs": 3, "max_num_batched_tokens": 32}, "speculate": None, "num_speculative": None}
    write_manifest(art, read_manifest(art).with_tuned("chat", tuned))
    return art


def test_each_setting_comes_from_the_first_place_that_gives_it(served):
    recipe = RuntimeSettings.resolve(served, {})
    assert (recipe.max_num_batched_tokens, recipe.threads, recipe.max_num_seqs, recipe.prefix_cache_tokens) == (64, 1, None, 4096)
    tuned = RuntimeSettings.resolve(served, {}, "chat")
    assert (tuned.max_num_batched_tokens, tuned.max_num_seqs, tuned.threads) == (32, 3, 1)
    flag = RuntimeSettings.resolve(served, {"max_num_batched_tokens": 8, "max_num_seqs": None}, "chat")
    assert (flag.max_num_batched_tokens, flag.max_num_seqs) == (8, 3)


def test_speculation_left_unset_is_the_engines_and_a_flag_replaces_it_whole(served):
    engine = load(served)
    default = RuntimeSettings.resolve(served, {}).speculative(engine)
    assert default.method == "ngram" and default.num_speculative == 2
    assert RuntimeSettings.resolve(served, {"speculate": "off"}).speculative(engine) is None
    assert RuntimeSettings.resolve(served, {"num_speculative": 5}).speculative(engine).num_speculative == 5
    assert RuntimeSettings.for_batch(2, engine, speculate=False).speculative(engine) is None
    assert RuntimeSettings.for_batch(2, engine, speculate="off").speculative(engine) is None
    gen = RuntimeSettings.for_batch(3, engine)
    assert (gen.max_num_seqs, gen.max_num_batched_tokens, gen.prefix_cache_tokens) == (3, engine.config.max_seq, 0)


def test_a_draft_is_named_by_path(served):
    engine = load(served)
    s = RuntimeSettings.for_batch(1, engine, speculate=Draft(str(served), num_speculative=3))
    spec = s.speculative(engine)
    assert (s.speculate, spec.method, spec.num_speculative) == ("draft", "draft", 3)


@pytest.mark.parametrize("kw, why", [({"speculate": "medusa"}, "speculate must be one of off, ngram, draft"),
                                     ({"speculate": "ngram", "draft": "x"}, "--draft goes with --speculate draft")])
def test_bad_runtime_settings_are_refused_by_name(kw, why):
    with pytest.raises(ValueError, match=why):
        RuntimeSettings(**kw)


def test_an_unknown_setting_or_workload_is_refused_by_name(served, tmp_path):
    with pytest.raises(ValueError, match="unknown runtime setting max_seqs"):
        RuntimeSettings.layered({"max_seqs": 4})
    with pytest.raises(ValueError, match="not tuned for workload 'rag' \\(tuned for: chat\\)"):
        RuntimeSettings.resolve(served, {}, "rag")
    broken = tmp_path / "broken"
    shutil.copytree(served, broken)
    (broken / "kiln.json").write_text(json.dumps({"tuned": ["not", "a", "mapping"]}))
    with pytest.raises(ValueError, match="kiln.json's tuned is not a JSON dict"):
        RuntimeSettings.resolve(broken, {}, "chat")


def test_one_conversion_of_a_request_into_a_generation_config():
    base = GenerationConfig(max_new_tokens=64, seed=1)
    cfg = GenerationConfig.of(base, max_tokens=8, stop="\n", top_k=None, temperature=0.5)
    assert (cfg.max_new_tokens, cfg.stop, cfg.top_k, cfg.temperature, cfg.seed) == (8, ("\n",), 0, 0.5, 1)
    assert GenerationConfig.of(stop=["a", "b"]).stop == ("a", "b")
    assert GenerationConfig.of(ignore_eos=True).stop_token_ids == ()
    assert GenerationConfig.of(logprobs=2).logprobs == 2
    with pytest.raises(ValueError, match="unknown generation setting frequency_penalty"):
        GenerationConfig.of(frequency_penalty=0.5)


def test_a_malformed_tuned_record_is_refused_in_one_line(served, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(served, broken)
    write_manifest(broken, read_manifest(broken).with_tuned("chat", {"serve": [1, 2]}))
    with pytest.raises(ValueError, match="record of workload 'chat' is malformed; tune again"):
        RuntimeSettings.resolve(broken, {}, "chat")
