"""A registry pull writes nothing outside its temp dir and removes nothing but the one artifact it
replaces (issue 13 #2, #9): crafted kiln.json names and OCI manifests, served by a real registry."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from compiler.cli import main
from compiler.runtime.verify import verify_artifact
from tests.ship.publish.registry import artifact_layers, push_raw


@pytest.fixture
def artifact(tiny_artifacts):
    return tiny_artifacts[("llama", "contrib")]


@pytest.fixture
def dest(artifact, tmp_path):
    """DEST holding another engine, and a file beside DEST: neither may change."""
    shutil.copytree(artifact, tmp_path / "engines" / "other")
    (tmp_path / "beside").write_text("keep")
    return tmp_path / "engines"


def _refused(capsys, ref: str, dest, *needles: str) -> None:
    assert main(["pull", ref, str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kiln: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    assert sorted(p.name for p in dest.iterdir()) == ["other"]  # nothing replaced, no temp dir left
    verify_artifact(dest / "other")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["beside", "engines"]
    assert (dest.parent / "beside").read_text() == "keep"


@pytest.mark.parametrize("name", ["../escape", "ABS", ".", "..", "other/../x", ""])
def test_crafted_name_in_pulled_kiln_json_is_refused(registry, artifact, dest, capsys, name):
    """Issue 13 #2: the name inside a pulled kiln.json decided what was deleted and replaced."""
    name = str(dest.parent / "abs") if name == "ABS" else name  # an absolute path (inside the test's dir)
    ref = push_raw(registry, f"kiln/name{hashlib.sha1(name.encode()).hexdigest()[:8]}", artifact_layers(artifact, name=name))
    _refused(capsys, ref, dest, "is not valid")


def _listed(artifact) -> dict:
    return json.loads((artifact / "kiln.json").read_text())


def _with(layers: list, **replace) -> list:
    return [(t, replace.get(t, d)) for t, d in layers]


def _hostile(artifact, case: str, tmp_path) -> tuple[list, dict | None]:
    """(layers, declared sizes) of a crafted manifest."""
    layers, m = artifact_layers(artifact), _listed(artifact)
    if case == "title-parent":
        return layers + [("../x", b"evil")], None
    if case == "title-subdir":
        return layers + [("sub/x", b"evil")], None
    if case == "title-absolute":
        return layers + [(str(tmp_path / "x"), b"evil")], None
    if case == "unlisted-layer":
        return layers + [("extra.bin", b"\0" * 4096)], None
    if case == "duplicate-title":
        return layers + [("tokenizer.json", b"{}")], None
    if case == "files-empty":
        return artifact_layers(artifact, files={}, sizes={}), None
    if case == "absolute-key":
        files = {**m["files"], str(tmp_path / "beside"): hashlib.sha256(b"keep").hexdigest()}
        return artifact_layers(artifact, files=files, sizes={**m["sizes"], str(tmp_path / "beside"): 4}), None
    if case == "no-sizes":
        return _with(artifact_layers(artifact), **{"kiln.json": json.dumps({k: v for k, v in m.items() if k != "sizes"}).encode()}), None
    if case == "oversize-blob":  # kiln.json and the manifest say 10 bytes; the blob (whose digest is listed) is 1 MiB
        big = b"\0" * (1 << 20)
        files = {**m["files"], "model.onnx.data": hashlib.sha256(big).hexdigest()}
        layers = _with(artifact_layers(artifact, files=files, sizes={**m["sizes"], "model.onnx.data": 10}), **{"model.onnx.data": big})
        return layers, {"model.onnx.data": 10}
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["title-parent", "title-subdir", "title-absolute", "unlisted-layer", "duplicate-title",
                                  "files-empty", "absolute-key", "no-sizes", "oversize-blob"])
def test_hostile_registry_manifest_is_refused(registry, artifact, dest, tmp_path, capsys, case):
    """Issue 13 #9: layer titles, unlisted or oversized layers and bad listings stop the pull
    before anything lands outside its temp dir (ORAS's pull would have written them)."""
    layers, sizes = _hostile(artifact, case, tmp_path)
    try:
        ref = push_raw(registry, f"kiln/{case}", layers, sizes=sizes)
    except OSError as e:  # a registry may refuse to store the lie itself: then it cannot be served either
        pytest.skip(f"the registry refuses this manifest ({e})")
    _refused(capsys, ref, dest)
    assert not (tmp_path / "x").exists() and not (dest / "sub").exists()


def test_pull_replaces_only_its_own_artifact(registry, artifact, dest, capsys):
    """A good pull lands beside the other engine; pulling again replaces just that directory; a
    non-artifact directory of the same name is never replaced."""
    ref = push_raw(registry, "kiln/good", artifact_layers(artifact))
    assert main(["pull", ref, str(dest)]) == 0
    assert main(["pull", ref, str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["llama-contrib", "other"]
    verify_artifact(dest / "llama-contrib")
    shutil.rmtree(dest / "llama-contrib")
    (dest / "llama-contrib").mkdir()
    (dest / "llama-contrib" / "notes.txt").write_text("mine")
    assert main(["pull", ref, str(dest)]) == 2
    assert "is not a kiln artifact" in capsys.readouterr().err
    assert (dest / "llama-contrib" / "notes.txt").read_text() == "mine"
