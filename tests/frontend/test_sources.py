"""Recipe sources: `hf://org/name[@rev]` against a local fake hub cache (offline), and errors."""

from __future__ import annotations

import shutil

import pytest

from compiler.errors import KilnError
from compiler.frontend.sources import resolve_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, tiny_checkpoints):
    """A Hugging Face cache holding kiln-test/tiny-llama at COMMIT, served with the hub offline."""
    import huggingface_hub.constants as c

    repo = tmp_path / "hub" / "models--kiln-test--tiny-llama"
    shutil.copytree(tiny_checkpoints["llama"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_hf_source_resolves_to_the_snapshot(fake_hub):
    assert resolve_source("hf://kiln-test/tiny-llama") == fake_hub
    assert resolve_source(f"hf://kiln-test/tiny-llama@{COMMIT}") == fake_hub


def test_build_from_hf_source(fake_hub, tmp_path):
    from tests.conftest import build_artifact

    art = build_artifact("hf://kiln-test/tiny-llama", tmp_path / "out", "from-hub")
    assert (art / "model.onnx").is_file() and (art / "tokenizer.json").is_file()


def test_unknown_hub_repo_is_one_line_error(fake_hub):
    with pytest.raises(KilnError, match="could not fetch hf://kiln-test/absent") as e:
        resolve_source("hf://kiln-test/absent")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["hf://just-a-name", "/no/such/dir"])
def test_bad_sources(bad):
    with pytest.raises(KilnError):
        resolve_source(bad)
