"""`kiln build` artifacts: manifest contents, atomic replacement, `kiln inspect`, `kiln run`."""

from __future__ import annotations

import hashlib
import json

import pytest

from compiler.cli import main
from compiler.runtime.config import EngineConfig


def test_manifest_records_what_went_in(tiny_artifacts, tiny_checkpoints):
    art = tiny_artifacts[("qwen2", "contrib")]
    m = json.loads((art / "kiln.json").read_text())
    assert m["recipe"]["name"] == "qwen2-contrib" and m["recipe"]["schema"] == 1
    assert m["source"]["architecture"] == "Qwen2ForCausalLM" and m["source"]["digest"].startswith("sha256:")
    assert m["backend"]["name"] == "onnxruntime" and m["backend"]["version"]
    assert m["build"]["seconds"] > 0 and m["build"]["peak_rss_bytes"] > 0 and m["build"]["host"]
    cpu = m["build"]["cpu"]  # the machine a quantised result came from
    assert cpu["model"] and isinstance(cpu["isa"], list) and cpu["cores"] >= 1
    assert {"model.onnx", "model.onnx.data", "engine.json", "tokenizer.json"} <= set(m["files"])
    for name, digest in m["files"].items():
        assert hashlib.sha256((art / name).read_bytes()).hexdigest() == digest
    assert [t["name"] for t in m["io"]["inputs"]][:3] == ["input_ids", "position_ids", "past_key.0"]
    engine = EngineConfig.load(art / "engine.json")
    assert engine.kv_cache.num_layers == 2 and engine.max_seq == 256 and engine.graph_flavour == "ort-contrib"


def test_rebuild_replaces_the_whole_artifact(tiny_checkpoints, tmp_path):
    from compiler.runtime.verify import verify_artifact
    from tests.conftest import build_artifact

    first = build_artifact(tiny_checkpoints["llama"], tmp_path, "x")
    (first / "stale-file").write_text("left from an old build")
    again = build_artifact(tiny_checkpoints["llama"], tmp_path, "x", max_seq=128)
    assert not (again / "stale-file").exists()
    manifest = json.loads((again / "kiln.json").read_text())
    assert manifest["recipe"]["max_seq"] == 128 and EngineConfig.load(again / "engine.json").max_seq == 128
    assert verify_artifact(again)["files"] == manifest["files"]  # every file is the new build's, as hashed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"], "temp or old dirs left behind"


def test_a_build_that_fails_midway_leaves_nothing_and_keeps_the_old_artifact(tiny_checkpoints, tmp_path, monkeypatch):
    """The failure is injected after the engine and tokenizer are written into the temp dir (the
    engine card is rendered just before kiln.json)."""
    import compiler.build.driver as cb
    from compiler.runtime.verify import verify_artifact
    from tests.conftest import build_artifact

    old = build_artifact(tiny_checkpoints["llama"], tmp_path, "x")
    old_bytes = {p.name: p.read_bytes() for p in old.iterdir()}
    written: list[set[str]] = []

    def fail(manifest):
        written.extend({p.name for p in d.iterdir()} for d in tmp_path.glob(".*.tmp"))
        raise RuntimeError("injected failure")

    monkeypatch.setattr(cb, "render_card", fail)
    for name in ("x", "fresh"):  # over an existing artifact, and a new name
        written.clear()
        with pytest.raises(RuntimeError, match="injected failure"):
            build_artifact(tiny_checkpoints["llama"], tmp_path, name, max_seq=128)
        assert len(written) == 1 and {"model.onnx", "engine.json", "tokenizer.json"} <= written[0], written
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x"], "a temp dir or a partial artifact was left"
    assert {p.name: p.read_bytes() for p in old.iterdir()} == old_bytes  # the previous artifact, untouched
    verify_artifact(old)
    assert EngineConfig.load(old / "engine.json").max_seq == 256


def test_inspect_prints_manifest_and_graph_summary(tiny_artifacts, capsys):
    art = tiny_artifacts[("llama", "contrib")]
    assert main(["inspect", str(art)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "com.microsoft::GroupQueryAttention 2" in out and "MB weights" in out
    assert main(["inspect", str(art), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["graph"]["weight_bytes"] > 0 and info["graph"]["ops"]["MatMul"] >= 5


def test_run_streams_text_and_ends_with_timing(tiny_artifacts, capsys):
    art = tiny_artifacts[("llama", "contrib")]
    assert main(["run", str(art), "--prompt", "The interpreter", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "prefill" in captured.err and "tok/s" in captured.err
    assert main(["run", str(art), "--prompt", "The interpreter", "--max-new-tokens", "8", "--json", "--chat"]) == 0
    res = json.loads(capsys.readouterr().out)
    # the tiny model does not emit its eos within 8 tokens of this chat prompt: 8 tokens, cut by length,
    # the same greedy tokens as the runtime's, and 7 decode steps timed
    from compiler.runtime import load

    want = load(art).generate("The interpreter", max_new_tokens=8, chat=True)
    assert want.finish_reason == "length" and len(want.token_ids) == 8
    assert res["finish_reason"] == "length" and res["tokens"] == want.token_ids and res["text"] == want.text
    assert res["prefill_ms"] > 0 and res["decode_tok_s"] > 0
