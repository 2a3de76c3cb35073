"""`kiln build` artifacts: manifest contents, atomic replacement, `kiln inspect`, `kiln run`."""

from __future__ import annotations

import hashlib
import json

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


def test_rebuild_replaces_the_artifact_atomically(tiny_checkpoints, tmp_path):
    from tests.conftest import build_artifact

    first = build_artifact(tiny_checkpoints["llama"], tmp_path, "x")
    stamp = json.loads((first / "kiln.json").read_text())["build"]["finished"]
    (first / "stale-file").write_text("left from an old build")
    again = build_artifact(tiny_checkpoints["llama"], tmp_path, "x", max_seq=128)
    assert not (again / "stale-file").exists()
    assert json.loads((again / "kiln.json").read_text())["recipe"]["max_seq"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"], "temp or old dirs left behind"
    assert stamp


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
    assert res["finish_reason"] in ("stop", "length") and res["decode_tok_s"] >= 0
