"""kiln tune end to end on a tiny engine: replay, candidates, the gate fallback, and what a tune
leaves behind (report, plot, tuned recipe, the artifact's record, kiln serve --tuned)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from compiler.build.recipe import load_recipe, parse_recipe
from compiler.runtime.settings import RuntimeSettings
from compiler.tune.replay import realise, replay
from compiler.tune.trace import make_trace
from compiler.tune.tune import runtime_candidates, variants
from compiler.tune.workload import parse_workload
from tests.conftest import build_artifact

SMALL = {"schema": 1, "name": "small", "requests": 6, "input_tokens": {"kind": "uniform", "min": 8, "max": 40},
         "output_tokens": {"kind": "fixed", "value": 6}, "shared_prefix": 0.5, "arrival": {"concurrency": 2},
         "targets": {"itl_p99_ms": 5000}, "seed": 3}


def _recipe(tmp_path, source, **fields) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"schema": 1, "name": "tiny", "source": str(source), "max_seq": 128, "max_batch": 4,
                                    "quality": {"window": 64}, **fields}))
    return path


def test_replay_runs_every_request_to_its_length(tiny_checkpoints, tmp_path):
    """EOS is ignored, so each point does the same work: tokens / s x seconds = the trace's tokens."""
    from compiler.runtime import load

    art = build_artifact(tiny_checkpoints["llama"], tmp_path, "t", max_seq=128)
    engine = load(art)
    w = parse_workload(SMALL)
    trace = make_trace(w, engine.config.vocab_size, engine.config.max_seq)
    ids = np.arange(5, 400) % engine.config.vocab_size
    trace = realise(trace, ids, w)
    for settings in (RuntimeSettings(), RuntimeSettings(max_num_seqs=1, max_num_batched_tokens=16, speculate="ngram")):
        m = replay(engine, trace, w, settings)
        assert m.throughput_tok_s * m.seconds == pytest.approx(6 * len(trace), rel=1e-9)
        assert 0 < m.ttft_p50_ms <= m.ttft_p99_ms and 0 < m.itl_p50_ms <= m.itl_p99_ms


def test_realise_keeps_lengths_and_the_shared_prefix():
    w = parse_workload(SMALL)
    trace = realise(make_trace(w, 500, 128), np.arange(1000, 3000), w)
    assert [len(r.prompt) for r in trace] == [len(r.prompt) for r in make_trace(w, 500, 128)]
    first = round(0.5 * len(trace[0].prompt))
    for r in trace:
        m = min(round(0.5 * len(r.prompt)), first)  # both hold the one shared text this far
        assert r.prompt[:m] == trace[0].prompt[:m]
    assert all(1000 <= t < 3000 for r in trace for t in r.prompt)
    assert len({r.prompt[-3:] for r in trace}) > 1  # the rest is each prompt's own


def test_runtime_candidates_start_with_serve_defaults_and_are_distinct():
    w = parse_workload(SMALL)
    cands = runtime_candidates(w, cores=2)
    assert cands[0] == RuntimeSettings()  # kiln serve's defaults: what the gain is measured against
    assert len({c.key() for c in cands}) == len(cands)
    assert {c.speculate for c in cands} == {None, "ngram"} and any(c.max_num_seqs == 2 for c in cands)
    no_prefix = parse_workload({**SMALL, "shared_prefix": 0.0})
    assert all(c.prefix_cache_tokens == 0 for c in runtime_candidates(no_prefix, 2)[1:])


def test_variants_carry_a_gate(tiny_checkpoints, tmp_path):
    recipe = load_recipe(_recipe(tmp_path, tiny_checkpoints["llama"]))
    names = [(n, r.name, r.quantization.scheme if r.quantization else None) for n, r in variants(recipe, ("int8-wo",))]
    assert names == [("recipe", "tiny", None), ("int8-wo", "tiny-int8-wo", "int8-wo")]
    gate = variants(recipe, ("int8-wo",))[1][1].quality
    assert gate.gate and gate.max_ppl_increase_pct == 15.0 and gate.window == 64
    quantised = parse_recipe({**recipe.resolved(), "quantization": {"scheme": "int8-wo"}})
    assert [n for n, _ in variants(quantised, ("int4-rtn",))] == ["recipe"]
    kv = dict(variants(quantised, ("int4-rtn", "kv-int8", "kiln-attention")))  # KV rows vary on a quantised recipe too
    assert list(kv) == ["recipe", "kv-int8", "kiln-attention"]
    assert (kv["kv-int8"].kv_cache.dtype, kv["kv-int8"].kv_cache.kernel, kv["kv-int8"].quantization.scheme) == ("int8", "kiln", "int8-wo")
    assert (kv["kiln-attention"].kv_cache.dtype, kv["kiln-attention"].kv_cache.kernel) == ("fp32", "kiln")
    assert kv["kv-int8"].quality.gate and kv["kv-int8"].name == "tiny-kv-int8"


def test_tiny_tune_end_to_end(tiny_checkpoints, tmp_path, capsys):
    """A 30 s tune: one quantised candidate fails its gate and is dropped with why; the choice is
    written as a tuned recipe, a plot, a report and the artifact's record, which serve reads."""
    from compiler.cli import main
    from compiler.tune.check import check

    recipe = _recipe(tmp_path, tiny_checkpoints["llama"], quality={"window": 64, "min_top1_agreement": 0.9999})
    workload = tmp_path / "small.yaml"
    workload.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "arts"
    rc = main(["tune", str(recipe), "--workload", str(workload), "--budget", "30s", "--schemes", "int4-rtn",
               "--out", str(out), "--json", "--quiet", "--check-rounds", "1"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "tune" / "tiny.small" / "report.json").read_text())
    assert len(report["dropped"]) == 1 and report["dropped"][0].startswith("int4-rtn: tiny-int4-rtn: quality limit violated")
    assert report["points"][0]["key"] == report["default"]["key"] and report["chosen"]["key"] == line["chosen"]
    assert (out / "tune" / "tiny.small" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tuned = load_recipe(tmp_path / "tiny.small.yaml")  # a valid recipe: the choice as settings
    chosen = report["chosen"]["settings"]["runtime"]
    assert tuned.name == "tiny.small" and tuned.serve.max_num_batched_tokens == chosen["max_num_batched_tokens"]
    record = json.loads((out / "tiny" / "kiln.json").read_text())["tuned"]["small"]
    assert record["point"]["key"] == line["chosen"]
    assert "Tuned for" in (out / "tiny" / "README.md").read_text()
    from compiler.runtime import load

    load(out / "tiny")  # the card's new hash is recorded: the artifact still verifies
    settings = RuntimeSettings.resolve(out / "tiny", {}, "small")
    assert settings.max_num_batched_tokens == chosen["max_num_batched_tokens"]
    assert RuntimeSettings.resolve(out / "tiny", {"max_num_batched_tokens": 7}, "small").max_num_batched_tokens == 7  # a flag wins
    with pytest.raises(ValueError, match="was not tuned for workload 'chat' \\(tuned for: small\\)"):
        RuntimeSettings.resolve(out / "tiny", {}, "chat")
    # the fresh-process check runs exactly when the choice is not the default, and measures a gain
    chose_default = report["chosen"]["key"] == report["default"]["key"]
    assert (line["fresh_process_gain"] is None) == chose_default == (report.get("fresh_process") is None)
    again = check(report, rounds=1)  # the same check, run here whatever was chosen
    assert again["gain"] > 0 and len(again["default"]) == len(again["chosen"]) == 1
    assert all(m["throughput_tok_s"] > 0 for m in again["default"] + again["chosen"])


@pytest.mark.parametrize("argv,message", [
    (["--workload", "chat", "--budget", "ten minutes"], "--budget 'ten minutes' is not a duration"),
    (["--workload", "nosuch"], "no workload named 'nosuch'"),
    (["--workload", "chat", "--schemes", "int9"], "--schemes: unknown scheme 'int9'"),
])
def test_bad_tune_input_is_one_line_exit_2(tiny_checkpoints, tmp_path, capsys, argv, message):
    from compiler.cli import main

    recipe = _recipe(tmp_path, tiny_checkpoints["llama"])
    assert main(["tune", str(recipe), "--out", str(tmp_path / "arts"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "tiny.chat.yaml").exists()


def test_tensorrt_recipes_are_refused(tiny_checkpoints, tmp_path, capsys):
    from compiler.cli import main

    recipe = _recipe(tmp_path, tiny_checkpoints["llama"], backend="tensorrt")
    assert main(["tune", str(recipe), "--workload", "chat", "--out", str(tmp_path / "arts")]) == 2
    assert "tunes single-rank onnxruntime cpu recipes" in capsys.readouterr().err
    assert not (tmp_path / "arts").exists()
