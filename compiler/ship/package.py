"""`kiln package ARTIFACT`: a deterministic archive of an artifact plus SHA256SUMS; and unpacking
such an archive (`kiln pull` from a directory or a .tar.gz).

The archive is a gzip'd ustar tar: `<name>/kiln.json` first, then the files it lists sorted by
name, mtimes 0, owner and group 0 with empty names, mode 0644, and a gzip header without a
timestamp or file name: the same artifact files always give the same archive bytes, whatever
the machine, clock or umask. SHA256SUMS lists the archive and every file inside it
(`sha256sum -c` reads it).

Unpacking streams the archive once and checks before writing: kiln.json is read first (in
memory, capped), then every member must be a regular file under the same one top directory
(a valid artifact name), listed in kiln.json with the size it has there, and not seen before;
anything else stops the unpack. The files land in a temp dir beside the destination, are
verified, and only then replace the one directory of that name (if it is a kiln artifact).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from compiler.errors import KilnError
from compiler.fsutil import is_artifact_name, replace_dir
from compiler.runtime.hashing import sha256_file
from compiler.runtime.manifest import Manifest
from compiler.runtime.verify import MANIFEST, MAX_MANIFEST_BYTES, ArtifactTampered, Listed, listing, verified

_NOT_OURS = "pass an archive written by `kiln package` (rebuild and re-package the artifact if it is older)"


def package(artifact: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Returns (archive, SHA256SUMS). The artifact is verified against its kiln.json first."""
    artifact = Path(artifact)
    files = sorted(listing(verified(artifact), artifact))
    if not is_artifact_name(artifact.name):
        raise KilnError(f"{artifact}: {artifact.name!r} is not a valid artifact name (it names the archive's directory)",
                        "rename the directory to lowercase letters, digits, '.', '_' and '-'")
    out_dir = Path(out_dir or artifact.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{artifact.name}.tar.gz"
    members = [MANIFEST, *files]
    tmp = archive.with_name(f".{archive.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in members:
                with open(artifact / name, "rb") as fh:
                    tar.addfile(_entry(f"{artifact.name}/{name}", os.fstat(fh.fileno()).st_size), fh)
        tmp.replace(archive)
        sums = out_dir / f"{artifact.name}.SHA256SUMS"
        lines = [f"{sha256_file(archive)}  {archive.name}"] + [f"{sha256_file(artifact / n)}  {artifact.name}/{n}" for n in sorted(members)]
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(sums)
    finally:
        tmp.unlink(missing_ok=True)
    return archive, sums


def _entry(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a kiln archive into dest/<name> (see the module docstring); returns that path."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack.", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r|gz") as tar:
                name = _extract(tar, tmp, archive)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise KilnError(f"{archive} does not unpack: {e}", "re-download the archive") from None
        return install(tmp, dest, name, str(archive))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(tar: tarfile.TarFile, tmp: Path, archive: Path) -> str:
    """Write the archive's files into tmp, checking each member before any of its bytes; returns the top name."""
    first = tar.next()
    top, name = _member(first, archive)
    if name != MANIFEST:
        raise KilnError(f"{archive}: the first member is not {top}/kiln.json", _NOT_OURS)
    if first.size > MAX_MANIFEST_BYTES:
        raise KilnError(f"{archive}: {top}/kiln.json is {first.size} bytes (more than {MAX_MANIFEST_BYTES})", _NOT_OURS)
    raw = tar.extractfile(first).read()
    try:
        expected: dict[str, Listed] = listing(Manifest.from_json(raw, f"{archive}: {top}").data, archive)
    except ArtifactTampered as e:
        raise KilnError(str(e)) from None
    (tmp / MANIFEST).write_bytes(raw)
    seen: set[str] = set()
    while (m := tar.next()) is not None:
        t, name = _member(m, archive)
        if t != top:
            raise KilnError(f"{archive} has more than one top directory ({top}, {t})", _NOT_OURS)
        if name in seen or name == MANIFEST:
            raise KilnError(f"{archive} holds {top}/{name} twice", _NOT_OURS)
        if name not in expected:
            raise KilnError(f"{archive}: {top}/{name} is not listed in its kiln.json", _NOT_OURS)
        if m.size != expected[name].size:
            raise KilnError(f"{archive}: {top}/{name} is {m.size} bytes, its kiln.json says {expected[name].size}", _NOT_OURS)
        with tar.extractfile(m) as src, open(tmp / name, "xb") as out:
            shutil.copyfileobj(src, out, 8 << 20)  # exactly m.size bytes: the member's own length
        seen.add(name)
    if missing := sorted(set(expected) - seen):
        raise KilnError(f"{archive} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} (listed in its kiln.json)",
                        "re-download the archive")
    return top


def _member(m: tarfile.TarInfo | None, archive: Path) -> tuple[str, str]:
    """(top, file) of a member `top/file` that is a regular file with a valid top name."""
    if m is None:
        raise KilnError(f"{archive} is empty", _NOT_OURS)
    top, _, name = m.name.partition("/")
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise KilnError(f"{archive}: {m.name} is not a regular file (a link, directory or device)", _NOT_OURS)
    if not is_artifact_name(top) or not name or "/" in name:
        raise KilnError(f"{archive}: {m.name!r} is not <name>/<file> with a valid artifact name "
                        "(lowercase letters, digits, '.', '_', '-'; not '.' or '..')", _NOT_OURS)
    return top, name


def install(tmp: Path, dest_root: Path, name: object, source: str) -> Path:
    """Verify the complete artifact in tmp (a dir in dest_root) and rename it to dest_root/name,
    replacing only an existing kiln artifact of that name."""
    if not is_artifact_name(name):
        raise KilnError(f"{source}: the artifact name {name!r} is not valid (lowercase letters, digits, '.', '_', '-'; "
                        "not '.' or '..')", "pull only artifacts written by `kiln build` / `kiln publish`")
    verified(tmp, f"{source} does not verify: ")
    dest = Path(dest_root) / name
    if dest.is_symlink() or (dest.exists() and not (dest.is_dir() and (dest / MANIFEST).is_file())):
        raise KilnError(f"{dest} exists and is not a kiln artifact: pulling {name} would replace it",
                        "move it away or pull into another directory")
    replace_dir(tmp, dest)
    return dest


__all__ = ["install", "package", "unpack"]
