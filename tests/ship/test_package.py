"""Shipping an artifact: the engine card, deterministic archives, tamper detection on load, and
unpacking that checks every member against kiln.json before writing it (issue 13 #1, #9)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from compiler.cli import main
from compiler.fsutil import ARTIFACT_NAME, replace_dir
from compiler.ship.package import package, unpack
from compiler.runtime import load
from compiler.runtime.verify import ArtifactTampered, verify_artifact


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
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in artifact.iterdir())
    assert verify_artifact(out)["files"] == verify_artifact(artifact)["files"]  # the same bytes, listed alike
    prompt = "Once upon a time"
    source, unpacked = (load(a).generate(prompt, max_new_tokens=12, stop_token_ids=()) for a in (artifact, out))
    assert len(unpacked.token_ids) == 12 and unpacked.token_ids == source.token_ids


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


# -- issue 13: pulls that deleted DEST, archives that wrote anything, listings that verified anything --


@pytest.fixture
def dest(artifact, tmp_path):
    """A DEST holding two other engines: a refused pull must leave both, and nothing else."""
    for name in ("engine-a", "engine-b"):
        shutil.copytree(artifact, tmp_path / "engines" / name)
    return tmp_path / "engines"


def _untouched(dest) -> None:
    assert sorted(p.name for p in dest.iterdir()) == ["engine-a", "engine-b"]  # no temp dir left either
    for name in ("engine-a", "engine-b"):
        verify_artifact(dest / name)


def _one_line(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kiln: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_archive_of_dot_does_not_delete_dest(artifact, dest, tmp_path, capsys):
    """Issue 13 #1: `cd artifacts/x && tar czf /tmp/x.tar.gz ./*` pulled into DEST removed DEST."""
    if shutil.which("tar") is None:
        pytest.skip("needs tar")
    (tmp_path / "dist").mkdir()
    archive = tmp_path / "dist" / "x.tar.gz"
    subprocess.run(["tar", "czf", str(archive), *sorted(f"./{p.name}" for p in artifact.iterdir())], cwd=artifact, check=True)
    _one_line(capsys, ["pull", str(archive), str(dest)], "not <name>/<file> with a valid artifact name")
    _untouched(dest)
    _one_line(capsys, ["pull", f"dir://{tmp_path / 'dist'}", str(dest)], "valid artifact name")
    _untouched(dest)


def _manifest(artifact) -> dict:
    return json.loads((artifact / "kiln.json").read_text())


def _tar(path, members: list) -> None:
    """A gzip'd tar of members: (name, bytes) regular files, or TarInfo for anything else."""
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))


def _crafted(artifact, case: str) -> list:
    """The members of `kiln package`'s archive of artifact (kiln.json first), altered by case."""
    m = _manifest(artifact)
    files = [(f"x/{n}", (artifact / n).read_bytes()) for n in sorted(m["files"])]
    head = [("x/kiln.json", json.dumps(m).encode())]

    def kiln(**fields) -> list:
        return [("x/kiln.json", json.dumps({**m, **fields}).encode())]

    def special(name: str, kind: bytes) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, "/etc/passwd"
        return info

    data = m["sizes"]["model.onnx.data"]
    return {
        "unlisted": head + [("x/evil.bin", b"\0" * 4096)] + files,
        "oversize": head + [(n, d + b"\0" * 100 if n.endswith("model.onnx.data") else d) for n, d in files],
        "bomb": head + [(n, b"\0" * (64 << 20) if n.endswith("model.onnx.data") else d) for n, d in files],
        "files-empty": kiln(files={}, sizes={}) + files,
        "absolute-key": kiln(files={**m["files"], "/etc/passwd": "0" * 64}, sizes={**m["sizes"], "/etc/passwd": 1}) + files,
        "dotdot-key": kiln(files={**m["files"], "../x": "0" * 64}, sizes={**m["sizes"], "../x": 1}) + files,
        "no-sizes": [("x/kiln.json", json.dumps({k: v for k, v in m.items() if k != "sizes"}).encode())] + files,
        "symlink": head + [special("x/model.onnx.data", tarfile.SYMTYPE)] + files,
        "hardlink": head + [special("x/model.onnx.data", tarfile.LNKTYPE)] + files,
        "directory": head + [special("x/sub", tarfile.DIRTYPE)] + files,
        "duplicate": head + files + files[:1],
        "two-tops": head + [(n.replace("x/", "y/"), d) for n, d in files],
        "nested": head + [("x/sub/model.onnx.data", b"\0" * data)] + files,
        "manifest-last": files + head,
        "missing": head + files[1:],
    }[case]


@pytest.mark.parametrize("case", ["unlisted", "oversize", "bomb", "files-empty", "absolute-key", "dotdot-key", "no-sizes",
                                  "symlink", "hardlink", "directory", "duplicate", "two-tops", "nested", "manifest-last",
                                  "missing"])
def test_crafted_archive_is_refused_and_dest_untouched(artifact, dest, tmp_path, capsys, case):
    """Issue 13 #9: members are checked against kiln.json (names, types, sizes) before they are
    written; a listing that is empty, has path keys or no sizes is refused."""
    archive = tmp_path / f"{case}.tar.gz"
    _tar(archive, _crafted(artifact, case))
    _one_line(capsys, ["pull", str(archive), str(dest)])
    _untouched(dest)


def test_good_archive_replaces_only_its_own_directory(artifact, dest, tmp_path):
    archive, _ = package(artifact, tmp_path / "pkg")
    assert unpack(archive, dest) == dest / "llama"
    assert unpack(archive, dest) == dest / "llama"  # again: the old copy is replaced, nothing else
    assert sorted(p.name for p in dest.iterdir()) == ["engine-a", "engine-b", "llama"]
    with tarfile.open(archive) as tar:
        assert tar.getnames()[0] == "llama/kiln.json"


@pytest.mark.parametrize("case", ["files-empty", "absolute-key", "dotdot-key", "backslash-key", "no-sizes", "unlisted-file",
                                  "size-mismatch", "symlink"])
def test_verify_refuses_bad_listings_and_extra_files(artifact, case):
    """verify_artifact: no empty listing, no paths as names, sizes checked, nothing unlisted, no links."""
    m = _manifest(artifact)
    edits = {"files-empty": {"files": {}, "sizes": {}},
             "absolute-key": {"files": {**m["files"], "/etc/hostname": "0" * 64}, "sizes": {**m["sizes"], "/etc/hostname": 1}},
             "dotdot-key": {"files": {**m["files"], "../kiln.json": "0" * 64}, "sizes": {**m["sizes"], "../kiln.json": 1}},
             "backslash-key": {"files": {**m["files"], "a\\b": "0" * 64}, "sizes": {**m["sizes"], "a\\b": 1}}}
    if case in edits:
        (artifact / "kiln.json").write_text(json.dumps({**m, **edits[case]}))
    elif case == "no-sizes":
        (artifact / "kiln.json").write_text(json.dumps({k: v for k, v in m.items() if k != "sizes"}))
    elif case == "unlisted-file":
        (artifact / "extra.bin").write_bytes(b"x")
    elif case == "size-mismatch":
        with open(artifact / "tokenizer.json", "ab") as f:
            f.write(b" ")
    else:
        (artifact / "tokenizer.json").unlink()
        (artifact / "tokenizer.json").symlink_to(artifact / "engine.json")
    expect = {"files-empty": "lists no files", "no-sizes": "no file sizes", "unlisted-file": "extra.bin is not listed",
              "size-mismatch": "tokenizer.json does not match its sha256 in kiln.json: it is",
              "symlink": "not a regular file"}.get(case, "not a plain file name")
    with pytest.raises(ArtifactTampered, match=expect):
        verify_artifact(artifact)


def test_inspect_refuses_a_tampered_artifact(artifact, capsys):
    """Issue 13 #11: `kiln inspect` on a tampered artifact printed it (or a traceback)."""
    data = artifact / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    _one_line(capsys, ["inspect", str(artifact)], "fails verification", "model.onnx.data")


def test_replace_dir_replaces_only_a_sibling(tmp_path):
    (tmp_path / "root" / "new").mkdir(parents=True)
    (tmp_path / "root" / "keep").mkdir()
    with pytest.raises(ValueError, match="not a sibling"):
        replace_dir(tmp_path / "root" / "new", tmp_path / "root" / ".")  # == root itself
    replace_dir(tmp_path / "root" / "new", tmp_path / "root" / "keep2")
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["keep", "keep2"]


def test_artifact_name_rule_is_the_recipes():
    from compiler.build.recipe import Recipe

    patterns = [getattr(x, "pattern", None) for x in Recipe.model_fields["name"].metadata]
    assert f"^{ARTIFACT_NAME.pattern}$" in patterns
