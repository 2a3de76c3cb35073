"""What every quantisation scheme shares: its recipe config base, per-layer overrides, and the
loop over the graph's linear layers.

Overrides keep chosen linears at higher precision, matched by node-name glob, e.g.
`{match: "/lm_head/*", precision: fp32}` or `{match: "/layers.0/*", precision: int8}`.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from compiler.config_base import StrictModel
from compiler.passes.base import Pass, PassResult
from compiler.passes.quant import qdq
from compiler.passes.quant.int4 import COLUMNS


class Override(StrictModel):
    match: str = Field(description="glob on MatMul node names, e.g. '/lm_head/*' or '/layers.0/*'")
    precision: Literal["fp32", "int8"] = "fp32"


class Calibration(StrictModel):
    source: str = Field("stdlib", description="'stdlib' (English text shipped with Python) or a text file")
    samples: int = Field(16, gt=0, le=1024)
    seq_len: int = Field(512, ge=16, le=8192)


class SchemeConfig(StrictModel):
    overrides: list[Override] = []

    def precision_of(self, name: str) -> str | None:
        """The override's precision for this linear, or None to apply the scheme."""
        for o in self.overrides:
            if qdq.matches(name, [o.match]):
                return o.precision
        return None


def per_channel(w: np.ndarray, one) -> tuple[np.ndarray, np.ndarray]:
    """one(w [K, n]) -> (q [K, n], scale [n]) applied to COLUMNS output channels at a time."""
    if w.shape[1] <= COLUMNS:
        return one(w)
    parts = [one(w[:, c:c + COLUMNS]) for c in range(0, w.shape[1], COLUMNS)]
    return np.concatenate([q for q, _ in parts], axis=1), np.concatenate([s for _, s in parts])


def int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: w [K, N] -> (q int8 [K, N], scale [N])."""
    return per_channel(w, _int8)


def _int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def with_precision(cfg: SchemeConfig, lins: Iterable[qdq.Linear]) -> Iterator[tuple[qdq.Linear, str | None]]:
    """Each linear with its resolved precision: its first matching override's, or None (the scheme's)."""
    for lin in lins:
        yield lin, cfg.precision_of(lin.node.name)


def scheme_linears(graph: ir.Graph, cfg: SchemeConfig, lins: Iterable[qdq.Linear],
                   counts: dict[str, int] | None = None) -> Iterator[qdq.Linear]:
    """Walks lins in order, applying each override as it comes (int8: a per-channel int8 weight;
    fp32: the linear is left as it is), counted in counts[precision]; yields the linears left for
    the scheme. Every scheme's loop over its linears goes through here."""
    for lin, precision in with_precision(cfg, lins):
        if precision is None:
            yield lin
            continue
        if precision == "int8":
            qdq.use_int8(graph, lin, lambda lin=lin: int8_per_channel(lin.read()))
            drop_if_unused(graph, lin)
        if counts is not None:
            counts[precision] = counts.get(precision, 0) + 1


def drop_if_unused(graph: ir.Graph, lin: qdq.Linear) -> None:
    """Remove the linear's float weight from the initializers once nothing reads it (a tied one stays)."""
    if not list(lin.weight.uses()):
        graph.initializers.pop(lin.weight.name, None)


class WeightQuantizer(Pass):
    """Base pass: quantise each linear's weight via `quantize_linear`, honouring overrides."""

    name = "quantize"

    def __init__(self, cfg: SchemeConfig):
        self.cfg = cfg

    def quantize_linear(self, graph: ir.Graph, lin: qdq.Linear) -> None:
        raise NotImplementedError

    def run(self, model: ir.Model) -> PassResult:
        graph, counts = model.graph, {"scheme": 0, "int8": 0, "fp32": 0}
        for lin in scheme_linears(graph, self.cfg, qdq.linears(graph), counts):
            self.quantize_linear(graph, lin)
            counts["scheme"] += 1
            drop_if_unused(graph, lin)
        note = f"{counts['scheme']} linears quantised, {counts['int8']} kept int8, {counts['fp32']} kept fp32"
        return PassResult(model, counts["scheme"] + counts["int8"] > 0, [note])


# Searches compare losses in float64 and take the first candidate within TIE of the best, so a
# different BLAS kernel or summation order cannot flip a near-tie (with float32 losses, noise of
# 1e-6 moved SmolLM2's int4-awq perplexity between +22% and +26%, and it differed by CPU).
TIE = 1e-9


def stable_argmin(losses: np.ndarray, axis: int = 0) -> np.ndarray:
    """Index of the first candidate (along axis) whose loss is within TIE of the smallest."""
    losses = np.asarray(losses, dtype=np.float64)
    best = losses.min(axis=axis, keepdims=True)
    return np.argmax(losses <= best + np.abs(best) * TIE, axis=axis)


def search_losses(x: np.ndarray, weights: list[np.ndarray], candidates: int, product, columns: int = COLUMNS) -> np.ndarray:
    """Per candidate i, sum over weights W of |product(i, W_c) - X W_c|^2 / (T N) in float64, where
    W_c runs over `columns` output columns at a time (a large lm_head never sits in memory in
    float64) and product(i, W_c) is candidate i's float64 output for that slice. x [T, K]."""
    x64 = x.astype(np.float64)
    losses = np.zeros(candidates)
    for w in weights:
        for c in range(0, w.shape[1], columns):
            wc = w[:, c:c + columns]
            ref = x64 @ wc.astype(np.float64)  # [T, n]
            for i in range(candidates):
                losses[i] += float(np.sum((product(i, wc) - ref) ** 2)) / (x.shape[0] * w.shape[1])
    return losses
