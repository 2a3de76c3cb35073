"""Artifact integrity: the directory holds exactly the files `kiln.json` lists, each with its
recorded size and sha256.

`kiln.json` maps `files: {name: sha256}` and `sizes: {name: bytes}`. A listing is refused when
it is empty, names a path rather than a plain file name, or disagrees with itself; a directory
is refused when a listed file is missing, not a regular file, of another size (checked for all
files before any is hashed) or another digest, or when it holds anything not listed. Refusals
name the file, before any engine is created. kiln.json itself is covered by the SHA256SUMS that
`kiln package` writes beside the archive. An artifact built before sizes were recorded is
refused too: `kiln build` rebuilds it (its up-to-date check fails).
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Iterable, NamedTuple

from compiler.errors import KilnError
from compiler.runtime.hashing import sha256_file
from compiler.runtime.manifest import MANIFEST, MAX_MANIFEST_BYTES, ArtifactTampered, read_manifest

_SHA256 = re.compile(r"[0-9a-f]{64}")


class Listed(NamedTuple):
    sha256: str
    size: int


# a file inside an artifact: one plain name (artifacts are flat), no separators or control characters
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@,-]*")


def is_file_name(name: object) -> bool:
    """A name that stays inside its directory: not absolute, no `/`, `\\`, `..`, drive or control characters."""
    return isinstance(name, str) and len(name) <= 255 and _FILE_NAME.fullmatch(name) is not None and ".." not in name


def record(manifest: dict, paths: Iterable[Path]) -> dict:
    """Add each file's sha256 and size to manifest["files"] / manifest["sizes"] (how kiln build lists them)."""
    files, sizes = manifest.setdefault("files", {}), manifest.setdefault("sizes", {})
    for p in paths:
        files[p.name], sizes[p.name] = sha256_file(p), p.stat().st_size
    return manifest


def listing(manifest: object, where: object) -> dict[str, Listed]:
    """The files a kiln.json lists, {name: Listed}, after checking the listing itself."""
    rebuild = "re-pull or rebuild the artifact with `kiln build`"
    if not isinstance(manifest, dict):
        raise ArtifactTampered(f"{where}: kiln.json is not a JSON object; {rebuild}")
    files, sizes = manifest.get("files"), manifest.get("sizes")
    if not isinstance(files, dict) or not files:
        raise ArtifactTampered(f"{where}: kiln.json lists no files; {rebuild}")
    if sizes is None:
        raise ArtifactTampered(f"{where}: kiln.json has no file sizes (built by an older kiln); "
                               "rebuild the artifact with `kiln build`")
    if not isinstance(sizes, dict) or set(sizes) != set(files):
        raise ArtifactTampered(f"{where}: kiln.json's sizes do not match its files; {rebuild}")
    out = {}
    for name, digest in files.items():
        if not is_file_name(name) or name == MANIFEST:
            raise ArtifactTampered(f"{where}: kiln.json lists {name!r}, which is not a plain file name "
                                   f"(absolute, '..', a separator or hidden); {rebuild}")
        size = sizes[name]
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest) or type(size) is not int or size < 0:
            raise ArtifactTampered(f"{where}: kiln.json's entry for {name} is not a sha256 and a size; {rebuild}")
        out[name] = Listed(digest, size)
    return out


def verify_artifact(path: Path) -> dict:
    """Check the directory against its kiln.json (see the module docstring); returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path).data
    files = listing(manifest, path)
    for entry in sorted(path.iterdir()):
        if entry.name != MANIFEST and entry.name not in files:
            raise ArtifactTampered(f"{path}: {entry.name} is not listed in kiln.json (an added file); "
                                   "remove it, or re-pull or rebuild the artifact")
    for name, (_, size) in sorted(files.items()):
        try:
            st = (path / name).lstat()
        except FileNotFoundError:
            raise ArtifactTampered(f"{path}: {name} is missing (listed in kiln.json); re-pull or rebuild the artifact") from None
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactTampered(f"{path}: {name} is not a regular file (a link or a directory); re-pull or rebuild the artifact")
        if st.st_size != size:
            raise ArtifactTampered(f"{path}: {name} does not match its sha256 in kiln.json: it is {st.st_size} bytes, "
                                   f"not {size} (tampered or truncated); re-pull or rebuild the artifact")
    for name, (digest, _) in sorted(files.items()):
        if sha256_file(path / name) != digest:
            raise ArtifactTampered(f"{path}: {name} does not match its sha256 in kiln.json (tampered or corrupt); "
                                   "re-pull or rebuild the artifact")
    return manifest


def verified(path: Path, prefix: str = "", fix: str | None = None) -> dict:
    """verify_artifact for kiln's commands: a refusal becomes a KilnError whose message is prefix and
    the refusal's own (it names the file and the fix), with fix appended when given."""
    try:
        return verify_artifact(path)
    except ArtifactTampered as e:
        raise KilnError(f"{prefix}{e}", fix) from None


__all__ = ["ArtifactTampered", "Listed", "MANIFEST", "MAX_MANIFEST_BYTES", "listing", "record", "verified", "verify_artifact"]
