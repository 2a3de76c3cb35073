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
])
def test_invalid_recipe_field(capsys, tmp_path, ckpt, field, value, needle):
    err = _expect_error(capsys, tmp_path, ["build", str(_recipe(tmp_path, ckpt, **{field: value}))], needle)
    assert "recipe.yaml" in err


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
