"""The 64-byte header of a serialised TensorRT plan, read without a GPU or TensorRT itself.

Layout (as observed on TensorRT-RTX 1.7 plans): magic `vtrt` at 0, plan size (uint64 LE) at 16,
TensorRT major/minor/patch bytes at 24..26, and a bitmask of compute-capability targets at 32
(bit 0 SM75, 1 SM80, 2 SM86, 3 SM89, 4 SM120, 5 SM121).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAGIC = b"vtrt"
TARGET_BITS = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")


@dataclass(frozen=True)
class PlanHeader:
    size: int
    version: str
    targets: list[str]


def read_header(head: bytes) -> PlanHeader:
    if len(head) < 40 or head[:4] != MAGIC:
        raise ValueError("not a TensorRT plan (no 'vtrt' magic in its header)")
    size = int.from_bytes(head[16:24], "little")
    version = ".".join(str(b) for b in head[24:27])
    mask = head[32]
    return PlanHeader(size, version, [t for i, t in enumerate(TARGET_BITS) if mask >> i & 1])


def read_plan_header(path: Path) -> PlanHeader:
    with open(path, "rb") as f:
        return read_header(f.read(64))
