"""Lazy, validating reader for one `.safetensors` file.

The header is parsed and checked up front (JSON, dtypes, offsets inside the file, byte counts
matching shapes), so a truncated or corrupt file fails before any build work with a one-line
message. Tensor data is read only when a weight is asked for, one tensor at a time, so a build
streams weights instead of holding the checkpoint in memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.errors import KilnError

# safetensors dtype tag -> (numpy dtype of the stored bytes, bytes per element)
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 on read
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def _is_count(x) -> bool:
    """A JSON integer >= 0 (bool is an int in Python, and not one here)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile:
    """One safetensors file: header parsed eagerly, data mapped lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = self._parse_header()

    def _bad(self, why: str) -> KilnError:
        return KilnError(
            f"{self.path} is not a valid safetensors file ({why})",
            "re-download or re-export the checkpoint",
        )

    def _parse_header(self) -> dict[str, TensorInfo]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._bad("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise self._bad(f"header length {n} exceeds the file size {size}")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise self._bad(f"header is not JSON: {e.msg if hasattr(e, 'msg') else e}") from None
            except RecursionError:
                raise self._bad("header JSON is nested too deeply") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        base = 8 + n
        out: dict[str, TensorInfo] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            out[name] = self._check_entry(name, meta, base, size)
        return out

    def _check_entry(self, name: str, meta: dict, base: int, size: int) -> TensorInfo:
        try:
            tag, shape, (b, e) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise self._bad(f"entry {name!r} lacks dtype/shape/data_offsets") from None
        if not isinstance(tag, str) or tag not in _DTYPES:
            raise self._bad(f"tensor {name!r} has unsupported dtype {tag!r}")
        if not all(_is_count(d) for d in shape):
            raise self._bad(f"tensor {name!r}: shape {list(shape)} is not a list of non-negative integers")
        if not (_is_count(b) and _is_count(e)):
            raise self._bad(f"tensor {name!r}: data_offsets {[b, e]} are not two non-negative integers")
        count = math.prod(shape)
        if e - b != count * _DTYPES[tag].itemsize:
            raise self._bad(f"tensor {name!r}: byte range {b}..{e} does not hold shape {list(shape)} of {tag}")
        if base + e > size:
            raise self._bad(f"truncated: tensor {name!r} ends at byte {base + e} but the file has {size}")
        return TensorInfo(name, tag, shape, base + b, base + e)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new numpy array (BF16 widened to float32).

        Each read maps the file only for the copy, so pages of weights already consumed do not
        stay resident in this process (a build's RSS stays near the tensors it holds)."""
        info = self.tensors[name]
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.begin, shape=(info.end - info.begin,))
        arr = raw.view(_DTYPES[info.dtype]).reshape(info.shape)
        if info.dtype == "BF16":
            wide = arr.astype(np.uint32)
            wide <<= 16  # in place: one pass less
            return wide.view(np.float32)
        return np.array(arr)
