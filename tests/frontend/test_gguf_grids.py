"""GGUF grids: every decoder reproduces the gguf package's own dequantisation bit for bit, on
random blocks of each type (any bytes are a valid block once the fp16 fields are finite)."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.frontend.gguf_grids import DECODERS, decode

# where each type keeps its fp16 fields (they must be finite for a meaningful comparison)
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,)}


def _random_rows(kind: str, rows: int, K: int, seed: int = 0) -> np.ndarray:
    size, elems, _ = DECODERS[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, K // elems, size), dtype=np.uint8)
    for at in F16_FIELDS[kind]:
        raw[..., at:at + 2] = rng.uniform(-0.05, 0.05, size=(rows, K // elems)).astype(np.float16).view(np.uint8).reshape(rows, K // elems, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_each_decoder_equals_the_gguf_package(kind):
    import gguf.quants

    rows, K = 6, 512
    raw = _random_rows(kind, rows, K)
    grid = decode(kind, raw, K)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(rows, K)
    assert np.array_equal(grid.dequantize(), want)
    assert grid.q.max() < 2 ** grid.bits and grid.scale.shape == (rows, K // grid.block)
    assert grid.bits == (4 if kind in ("Q4_0", "Q4_1", "Q4_K") else 8)


def test_a_row_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="Q4_1 row of 64 elements should take 40 bytes"):
        decode("Q4_1", np.zeros((2, 41), np.uint8), 64)
