"""The quantisation grids of a GGUF file's tensors, decoded exactly from their llama.cpp blocks.

Every supported type is one form, per block of `block` consecutive input features of a row:
    w = scale * (q - zero_point) + offset
q      [rows, K] uint8: the stored integers (0..2^bits - 1)
scale  [rows, K/block] float32: llama.cpp's own float product (d, or d * sub-block scale)
zero_point  an integer for the whole tensor (the type's fixed offset: 8 for Q4_0, 128 for Q8_0)
offset [rows, K/block] float32 or None: the block's min (Q4_1, Q5_1, Q4_K, Q5_K)
bits   4 when q fits in 4 bits, else 8.

Layouts (ggml's block structs; fp16 d first unless said):
  Q4_0  32: d, 16 bytes of nibbles (low nibbles elements 0..15, high 16..31); w = d (q - 8)
  Q4_1  32: d, m, nibbles as Q4_0; w = d q + m
  Q5_0  32: d, 4 bytes of fifth bits, nibbles; w = d (q - 16)
  Q5_1  32: d, m, 4 bytes of fifth bits, nibbles; w = d q + m
  Q8_0  32: d, 32 int8; w = d q
  Q4_K  256 in 8 sub-blocks of 32: d, dmin, 12 bytes of 6-bit (scale, min) pairs, 128 bytes of
        nibbles (each 32 bytes: low nibbles one sub-block, high nibbles the next); w = d sc q - dmin m
  Q5_K  as Q4_K with 32 bytes of fifth bits before the nibbles
  Q6_K  256 in 16 sub-blocks of 16: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8
        scales, d last; w = d sc (q - 32)
A decoded grid is checked against the dense weights the importer wrote (see passes/quant/gguf.py),
so a layout mistake can never reach an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Grid:
    q: np.ndarray  # [rows, K] uint8
    scale: np.ndarray  # [rows, K/block] float32
    zero_point: int
    offset: np.ndarray | None  # [rows, K/block] float32
    block: int
    bits: int
    kind: str  # the GGUF type name

    def dequantize(self) -> np.ndarray:
        """[rows, K] float32, as llama.cpp computes it."""
        s = np.repeat(self.scale, self.block, axis=1)
        w = s * (self.q.astype(np.float32) - np.float32(self.zero_point))
        return w + np.repeat(self.offset, self.block, axis=1) if self.offset is not None else w

    def take_rows(self, order: np.ndarray) -> "Grid":
        off = None if self.offset is None else self.offset[order]
        return Grid(self.q[order], self.scale[order], self.zero_point, off, self.block, self.bits, self.kind)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of each block, as float32 [rows, nblocks, 1]."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[.., 16] bytes -> [.., 32]: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[.., 4] bytes -> [.., 32] bits (element j is bit j of the little-endian uint32)."""
    return (np.unpackbits(qh, axis=-1, bitorder="little") & 1).astype(np.uint8)


def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte fields [.., 12] -> 6-bit scales and mins [.., 8] (float32)."""
    lo, hi = sc[..., 0:4], sc[..., 4:8]
    scales = np.concatenate([lo & 63, (sc[..., 8:12] & 0xF) | ((lo >> 6) << 4)], axis=-1)
    mins = np.concatenate([hi & 63, (sc[..., 8:12] >> 4) | ((hi >> 6) << 4)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q4_0(b):
    return _nibbles(b[..., 2:18]), _f16(b, 0), 8, None, 32, 4


def _q4_1(b):
    return _nibbles(b[..., 4:20]), _f16(b, 0), 0, _f16(b, 2), 32, 4


def _q5_0(b):
    return _nibbles(b[..., 6:22]) | (_fifth_bits(b[..., 2:6]) << 4), _f16(b, 0), 16, None, 32, 8


def _q5_1(b):
    return _nibbles(b[..., 8:24]) | (_fifth_bits(b[..., 4:8]) << 4), _f16(b, 0), 0, _f16(b, 2), 32, 8


def _q8_0(b):
    q = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, _f16(b, 0), 128, None, 32, 8


def _k_sub_blocks(qs: np.ndarray) -> np.ndarray:
    """128 bytes of Q4_K/Q5_K nibbles [.., 128] -> [.., 8, 32] (sub-block 2c low, 2c+1 high)."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.stack([chunks & 0xF, chunks >> 4], axis=-2).reshape(*qs.shape[:-1], 8, 32)


def _q4_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)  # [r, n, 1]
    sc, mn = _k_scales(b[..., 4:16])  # [r, n, 8]
    q = _k_sub_blocks(b[..., 16:144])  # [r, n, 8, 32]
    return _k_out(q, d * sc, -(dmin * mn), 0, 4)


def _q5_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[..., 4:16])
    high = np.unpackbits(b[..., 16:48], axis=-1, bitorder="little").reshape(*b.shape[:-1], 32, 8)  # [.., l, bit]
    q = _k_sub_blocks(b[..., 48:176]) | (np.moveaxis(high, -1, -2) << 4)  # sub-block j takes bit j of qh[l]
    return _k_out(q, d * sc, -(dmin * mn), 0, 8)


def _q6_k(b):
    ql, qh, sc = b[..., 0:128], b[..., 128:192], b[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(b, 208)
    halves = []
    for h in range(2):  # each half: 128 elements from 64 ql bytes and 32 qh bytes
        lo, hi = ql[..., 64 * h:64 * h + 64], qh[..., 32 * h:32 * h + 32]
        halves += [(lo[..., :32] & 0xF) | ((hi & 3) << 4), (lo[..., 32:] & 0xF) | (((hi >> 2) & 3) << 4),
                   (lo[..., :32] >> 4) | (((hi >> 4) & 3) << 4), (lo[..., 32:] >> 4) | (((hi >> 6) & 3) << 4)]
    q = np.stack(halves, axis=-2).reshape(*b.shape[:-1], 16, 16)  # 8 runs of 32 -> 16 sub-blocks of 16
    return _k_out(q, d * sc, None, 32, 8)


def _k_out(q, scale, offset, zp, bits):
    """Sub-block form [r, n, s, e] -> flat [r, n*s*e] values and [r, n*s] scales/offsets."""
    r = q.shape[0]
    flat = lambda a: None if a is None else np.ascontiguousarray(a.reshape(r, -1), dtype=np.float32)  # noqa: E731
    return q.reshape(r, -1).astype(np.uint8), flat(scale), zp, flat(offset), q.shape[-1], bits


# type name -> (bytes per block, elements per block, decoder)
DECODERS = {"Q4_0": (18, 32, _q4_0), "Q4_1": (20, 32, _q4_1), "Q5_0": (22, 32, _q5_0), "Q5_1": (24, 32, _q5_1),
            "Q8_0": (34, 32, _q8_0), "Q4_K": (144, 256, _q4_k), "Q5_K": (176, 256, _q5_k), "Q6_K": (210, 256, _q6_k)}


def decode(kind: str, raw: np.ndarray, K: int) -> Grid:
    """raw [rows, bytes] uint8 of one tensor of GGUF type `kind` with K elements a row."""
    size, elems, fn = DECODERS[kind]
    if K % elems or raw.shape[-1] != K // elems * size:
        raise ValueError(f"a {kind} row of {K} elements should take {K // elems * size} bytes, got {raw.shape[-1]}")
    blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], K // elems, size)
    q, scale, zp, offset, block, bits = fn(blocks)
    rows = raw.shape[0]
    q = q.reshape(rows, K)
    scale = np.ascontiguousarray(scale.reshape(rows, -1), dtype=np.float32)
    offset = None if offset is None else np.ascontiguousarray(offset.reshape(rows, -1), dtype=np.float32)
    return Grid(q, scale, zp, offset, block, bits, kind)


class GgufTensors:
    """The quantised tensors of a GGUF file by GGUF name, decoded on demand (memory-mapped)."""

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        field = self.reader.fields.get("general.architecture")
        self.arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None

    def kind(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def grid(self, name: str) -> Grid | None:
        """The tensor's grid [rows = output features, K = input features], or None for a type
        kiln does not map (F32, F16, BF16, IQ*, ...)."""
        t = self.tensors[name]
        if t.tensor_type.name not in DECODERS:
            return None
        K = int(t.shape[0])  # GGUF lists the fastest-varying (input) dimension first
        return decode(t.tensor_type.name, np.asarray(t.data).reshape(int(np.prod(t.shape[1:])), -1), K)
