"""Artifact integrity on load: every file `kiln.json` lists must match its recorded sha256.

A tampered or truncated file is refused with the file's name, before any engine is created.
(kiln.json itself is covered by the SHA256SUMS that `kiln package` writes beside the archive.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class ArtifactTampered(ValueError):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_artifact(path: Path) -> None:
    manifest_path = Path(path) / "kiln.json"
    if not manifest_path.is_file():
        raise ArtifactTampered(f"{path} has no kiln.json: not a kiln artifact, or an incomplete copy")
    files = json.loads(manifest_path.read_text()).get("files", {})
    for name, digest in sorted(files.items()):
        f = Path(path) / name
        if not f.is_file():
            raise ArtifactTampered(f"{path}: {name} is missing (listed in kiln.json); re-pull or rebuild the artifact")
        if sha256(f) != digest:
            raise ArtifactTampered(f"{path}: {name} does not match its sha256 in kiln.json (tampered or corrupt); "
                                   "re-pull or rebuild the artifact")
