"""Putting a finished directory in place, shared by `kiln build` and `kiln pull`, and the rules for
the names that become directories and files there.

A directory is always written complete under a temp name beside its destination and then
renamed. An existing destination is first moved aside to a hidden sibling and removed only
once the new one is in place: nothing but that one directory is ever removed, and a failed
rename puts the old one back.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from compiler.runtime.verify import is_file_name  # noqa: F401  (the runtime owns it: it verifies artifacts)

# the recipe's `name` field (compiler/build/recipe.py): what an artifact directory may be called
ARTIFACT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def is_artifact_name(name: object) -> bool:
    return isinstance(name, str) and name not in (".", "..") and ARTIFACT_NAME.fullmatch(name) is not None



def replace_dir(tmp: Path, dest: Path) -> None:
    """Rename the directory tmp to dest, its sibling. An existing dest is moved aside first and
    removed after; if the rename fails, it is moved back. Refuses a dest that is not a plain
    sibling of tmp (e.g. `dest_root / "."`, which pathlib collapses to dest_root itself)."""
    tmp, dest = Path(tmp), Path(dest)
    if dest.name in ("", ".", "..") or dest.parent.resolve() != tmp.parent.resolve() or dest.name == tmp.name:
        raise ValueError(f"refusing to replace {dest} with {tmp}: not a sibling directory")
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{time.time_ns()}")
        dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


__all__ = ["ARTIFACT_NAME", "is_artifact_name", "is_file_name", "replace_dir"]
