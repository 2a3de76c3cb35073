"""`kiln package ARTIFACT`: a deterministic archive of an artifact plus SHA256SUMS.

The archive is a gzip'd ustar tar with entries sorted by path, mtimes 0, owner and group 0 with
empty names, modes 0644 / 0755, and a gzip header without a timestamp or file name: the same
artifact files always give the same archive bytes, whatever the machine, clock or umask.
SHA256SUMS lists the archive and every file inside it (`sha256sum -c` reads it).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from compiler.errors import KilnError
from compiler.runtime.verify import ArtifactTampered, sha256, verify_artifact


def package(artifact: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Returns (archive, SHA256SUMS). The artifact is verified against its kiln.json first."""
    artifact = Path(artifact)
    try:
        verify_artifact(artifact)
    except ArtifactTampered as e:
        raise KilnError(str(e), "rebuild the artifact with `kiln build`") from None
    out_dir = Path(out_dir or artifact.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{artifact.name}.tar.gz"
    files = sorted(p for p in artifact.rglob("*") if p.is_file())
    tmp = archive.with_name(f".{archive.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for f in files:
            with open(f, "rb") as fh:
                tar.addfile(_entry(f"{artifact.name}/{f.relative_to(artifact).as_posix()}", f.stat().st_size), fh)
    tmp.replace(archive)
    sums = out_dir / f"{artifact.name}.SHA256SUMS"
    lines = [f"{sha256(archive)}  {archive.name}"] + [f"{sha256(f)}  {artifact.name}/{f.relative_to(artifact).as_posix()}" for f in files]
    sums.write_text("\n".join(lines) + "\n")
    return archive, sums


def _entry(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a kiln archive (regular files under one top directory only) into dest/<name>;
    it is extracted and verified in a temp dir first, so a damaged archive leaves nothing."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack.", dir=dest))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            tops = {m.name.split("/", 1)[0] for m in members}
            if len(tops) != 1 or any(not m.isfile() or ".." in m.name.split("/") or m.name.startswith("/") for m in members):
                raise KilnError(f"{archive} is not a kiln artifact archive (one directory of regular files)",
                                "pass an archive written by `kiln package`")
            tar.extractall(tmp, filter="data")
        name = tops.pop()
        verify_artifact(tmp / name)
        out = dest / name
        if out.exists():
            shutil.rmtree(out)
        (tmp / name).rename(out)
        return out
    except (ArtifactTampered, tarfile.TarError, OSError, EOFError) as e:
        raise KilnError(f"{archive} does not unpack into a verified artifact: {e}", "re-download the archive") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["package", "unpack"]
