"""Bad input: exit code 2, one line naming the problem and the fix, no traceback, nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.cli import main


def _recipe(tmp: Path, source: Path, **fields) -> Path:
    data = {"schema": 1, "name": "bad", "source": str(source), "max_seq": 64, **fields}
    path = tmp / "recipe.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def _expect_error(capsys, tmp: Path, argv: list[str], *needles: str) -> str:
    out_root = tmp / "out"
    code = main([*argv, "--out", str(out_root)] if argv[0] == "build" else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kiln: error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, err
    assert not out_root.exists() or not any(out_root.iterdir()), "a failed build left files behind"
    return err


@pytest.fixture
def ckpt(tiny_checkpoints, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["llama"], dst)
    return dst


def test_missing_config(capsys, tmp_path, ckpt):
    (ckpt / "config.json").unlink()
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "config.json")


def test_truncated_safetensors(capsys, tmp_path, ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "truncated", "model.safetensors")


def test_corrupt_safetensors_header(capsys, tmp_path, ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at!"
    f.write_bytes(bytes(data))
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "not a valid safetensors file")


def _rewrite_weights(ckpt: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_missing_weight(capsys, tmp_path, ckpt):
    _rewrite_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "lacks weight model.layers.1.mlp.down_proj.weight")


def test_weight_of_wrong_shape(capsys, tmp_path, ckpt):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:32]

    _rewrite_weights(ckpt, edit)
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "model.layers.0.self_attn.q_proj.weight", "shape")


def test_unknown_architecture(capsys, tmp_path, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    err = _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "GPTNeoXForCausalLM")
    assert "LlamaForCausalLM" in err and "MistralForCausalLM" in err and "Qwen2ForCausalLM" in err


def test_unsupported_rope_scaling_is_refused_not_ignored(capsys, tmp_path, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "yarn")


@pytest.mark.parametrize("field,value,needle", [
    ("max_seq", -1, "'max_seq'"),
    ("backend", "tensorflow", "'backend'"),
    ("passes", ["merge_qkv", "fuse_everything"], "fuse_everything"),
    ("colour", "blue", "'colour': unknown field"),
    ("kv_cache", {"dtype": "int4"}, "'kv_cache.dtype'"),
    ("kv_cache", {"dtype": "int8", "attention": "onnxruntime"}, "dtype int8 needs attention: kiln"),
    ("kv_cache", {"dtype": "fp8", "blocks": 16}, "'kv_cache.blocks': unknown field"),
    ("kv_cache", {"attention": "flash"}, "'kv_cache.attention'"),
])
def test_invalid_recipe_field(capsys, tmp_path, ckpt, field, value, needle):
    err = _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt, **{field: value}))], needle)
    assert "recipe.yaml" in err


def test_kiln_attention_where_it_cannot_run_is_refused_naming_kv_cache(capsys, tmp_path, ckpt):
    recipe = _recipe(tmp_path, ckpt, kv_cache={"dtype": "int8"}, backend="tensorrt")
    _expect_error(capsys, tmp_path, ["build", str(recipe)], "kv_cache (dtype int8, attention kiln) runs on backend onnxruntime")


def test_recipe_missing_source_and_bad_yaml(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("schema: 1\nname: x\n")
    _expect_error(capsys, tmp_path, ["build", str(path)], "'source'", "missing")
    path.write_text("schema: 1\nname: [x\n")
    _expect_error(capsys, tmp_path, ["build", str(path)], "not valid YAML")


def test_run_on_a_directory_that_is_not_an_artifact(capsys, tmp_path):
    _expect_error(capsys, tmp_path, ["run", str(tmp_path), "--prompt", "hi"], "not a kiln artifact")


def test_real_process_exit_code_and_no_traceback(tmp_path, ckpt):
    (ckpt / "config.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "compiler.cli", "build", str(_recipe(tmp_path, ckpt)), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "bad").exists()


# -- issue 13: a careless or hostile user's input ------------------------------------------------
def _raw_safetensors(path: Path, header_json: bytes, data: bytes = b"\0" * 16) -> None:
    import struct

    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)


@pytest.mark.parametrize("header,needle", [
    (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]}}', "data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]}}', "shape"),
    (b'{"w": {"dtype": "F32", "shape": ["2", 2], "data_offsets": [0, 16]}}', "shape"),
    (b'{"w": {"dtype": "F32", "shape": [true, 4], "data_offsets": [0, 16]}}', "shape"),
    (b'{"w": {"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]}}', "dtype"),
    (b'{"w": ' * 5000 + b'1' + b'}' * 5000, "nested too deeply"),
])
def test_crafted_safetensors_header(capsys, tmp_path, ckpt, header, needle):
    _raw_safetensors(ckpt / "model.safetensors", header)
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "model.safetensors", needle)


@pytest.mark.parametrize("content", [b"garbage, not JSON", b'{"model": {"type": "NoSuchModel"}}', b"[]"])
def test_garbage_tokenizer_is_refused_at_build(capsys, tmp_path, ckpt, content):
    (ckpt / "tokenizer.json").write_bytes(content)
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "tokenizer")


def test_broken_chat_template_is_refused_at_build(capsys, tmp_path, ckpt):
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "tokenizer files do not load")


def test_missing_tokenizer_is_refused_at_build(capsys, tmp_path, ckpt):
    (ckpt / "tokenizer.json").unlink()
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], "no tokenizer.json")


@pytest.mark.parametrize("key,value", [("eos_token_id", "tiny"), ("pad_token_id", -3), ("bos_token_id", [1.5])])
def test_bad_special_token_ids(capsys, tmp_path, ckpt, key, value):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "generation_config.json").unlink(missing_ok=True)
    _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt))], key)


@pytest.fixture(scope="module")
def good_artifact(tiny_checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, out root) of a built tiny artifact that bad overrides must leave intact."""
    tmp = tmp_path_factory.mktemp("overrides")
    recipe = _recipe(tmp, tiny_checkpoints["llama"], name="good")
    assert main(["build", str(recipe), "--out", str(tmp / "out"), "--quiet"]) == 0
    return recipe, tmp / "out"


@pytest.mark.parametrize("flag,value,needle", [
    ("--max-seq", "-5", "'max_seq'"), ("--max-seq", "0", "'max_seq'"), ("--max-batch", "-1", "'max_batch'"),
    ("--max-batch", "0", "'max_batch'"), ("--max-seq", "100000000", "'max_seq'"),
])
def test_cli_overrides_are_validated_like_the_recipe(capsys, good_artifact, flag, value, needle):
    recipe, out = good_artifact
    before = (out / "good" / "kiln.json").read_bytes()
    assert main(["build", str(recipe), "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kiln: error: ") and needle in err and "override" in err, err
    assert (out / "good" / "kiln.json").read_bytes() == before, "a refused override replaced the artifact"
    assert sorted(p.name for p in out.iterdir()) == ["good"], "a refused override left files behind"


def test_cli_override_applies_when_valid(capsys, good_artifact):
    recipe, out = good_artifact
    assert main(["build", str(recipe), "--out", str(out), "--max-seq", "48", "--quiet"]) == 0
    assert json.loads((out / "good" / "engine.json").read_text())["max_seq"] == 48
    assert main(["build", str(recipe), "--out", str(out), "--quiet"]) == 0  # back to the recipe's 64


@pytest.mark.parametrize("edit,needle", [
    (lambda e: e.pop("inputs"), "not a valid kiln engine config"),
    (lambda e: e.update(max_batch="four"), "max_batch"),
    (lambda e: e.update(max_seq=-1), "max_seq"),
    (lambda e: e.update(model_file="../../etc/passwd"), "model_file"),
    (lambda e: e.update(model_file="tokenizer.json"), "ONNX Runtime cannot load"),
    (lambda e: e["session"].update(graph_optimization_level="ORT_FAST"), "graph_optimization_level"),
    (lambda e: e.update(format=99), "engine format"),
])
def test_edited_engine_json(capsys, tmp_path, tiny_artifacts, edit, needle):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts[("llama", "contrib")], art)
    engine = json.loads((art / "engine.json").read_text())
    edit(engine)
    (art / "engine.json").write_text(json.dumps(engine))
    # kiln run verifies first: the edit is tampering
    _expect_error(capsys, tmp_path, ["run", str(art), "--prompt", "hi"], "engine.json", "does not match its sha256")
    # with the manifest's digest updated too (an edit made on purpose), the engine config itself is checked
    from compiler.runtime.verify import record

    manifest = json.loads((art / "kiln.json").read_text())
    record(manifest, [art / "engine.json"])  # its sha256 and size
    (art / "kiln.json").write_text(json.dumps(manifest))
    _expect_error(capsys, tmp_path, ["run", str(art), "--prompt", "hi"], needle)
