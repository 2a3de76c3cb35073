"""Shipping an artifact: the engine card, deterministic archives, and tamper detection on load."""

from __future__ import annotations

import os
import shutil

import pytest

from compiler.cli import main
from compiler.package import package, unpack
from compiler.runtime import load
from compiler.runtime.verify import ArtifactTampered


@pytest.fixture
def artifact(tiny_artifacts, tmp_path):
    dst = tmp_path / "llama"
    shutil.copytree(tiny_artifacts[("llama", "contrib")], dst)
    return dst


def test_engine_card_is_rendered_and_recorded(artifact):
    card = (artifact / "README.md").read_text()
    for needle in ("LlamaForCausalLM", "## Passes", "merge_qkv", "## Load it", "load(\"llama-contrib\")"):
        assert needle in card
    load(artifact)  # the card is one of the verified files


def test_archive_digest_is_deterministic(artifact, tmp_path):
    a, sums_a = package(artifact, tmp_path / "a")
    for f in artifact.iterdir():  # other mtimes and modes must not change the bytes
        os.utime(f, (1_000_000, 1_000_000))
        f.chmod(0o600)
    b, _ = package(artifact, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    lines = sums_a.read_text().splitlines()
    assert lines[0].endswith("  llama.tar.gz") and any(line.endswith("llama/kiln.json") for line in lines)


def test_unpacked_archive_loads_and_generates(artifact, tmp_path):
    archive, _ = package(artifact, tmp_path / "pkg")
    out = unpack(archive, tmp_path / "unpacked")
    assert load(out).generate("Hello", max_new_tokens=4).token_ids


def test_tampered_file_is_refused_on_load(artifact, capsys):
    data = artifact / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactTampered, match="model.onnx.data does not match its sha256"):
        load(artifact)
    assert main(["run", str(artifact), "--prompt", "Hi"]) == 2
    assert "tampered" in capsys.readouterr().err


def test_missing_file_is_refused(artifact):
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(ArtifactTampered, match="tokenizer.json is missing"):
        load(artifact)
