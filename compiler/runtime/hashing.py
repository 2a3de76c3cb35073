"""sha256 of files and byte streams, read in chunks so a multi-GB weight file is never held in memory.

The runtime owns it (it verifies artifacts with it; only the standard library is imported here);
the build side records and checks digests with it too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator

CHUNK = 8 << 20  # bytes read at a time


def file_chunks(path: str | Path) -> Iterator[bytes]:
    """The file's bytes, CHUNK at a time."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def sha256_chunks(chunks: Iterable[bytes]) -> str:
    """Hex sha256 of the chunks, one after another."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's contents."""
    return sha256_chunks(file_chunks(path))


__all__ = ["CHUNK", "file_chunks", "sha256_chunks", "sha256_file"]
