"""int8-sq: SmoothQuant W8A8 (arXiv 2211.10438) with static per-tensor activation scales.

Per set of linears reading one activation X: s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)
moves outliers from activations into weights (1/s folded into the RMSNorm scale or the `up`
columns; s = 1 where nothing can absorb it). Then X/s is quantised to int8 with one static
scale (max |X/s| over calibration / 127) and W*s to int8 per output channel.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from compiler.passes.base import Pass, PassResult
from compiler.passes.quant import qdq
from compiler.passes.quant.base import (Calibration, SchemeConfig, int8_per_channel, scheme_linears, search_losses,
                                        stable_argmin)
from compiler.passes.quant.smoothing import expect_sink, fold, groups, private


class Int8SqConfig(SchemeConfig):
    scheme: Literal["int8-sq"]
    alpha: float | Literal["search"] = Field(
        "search", description="migration strength in [0, 1] (0 keeps outliers in X, 1 moves them to W), or "
                              "'search': per layer, the alpha on a 0.05 grid whose W8A8 output best matches fp32")
    calibration: Calibration = Calibration()


class ActivationQuantizer(Pass):
    """Shared loop of the W8A8-style schemes: smoothing (optional), then per-linear quantisation."""

    name = "quantize_activations"
    smooth = False

    def __init__(self, cfg, stats: dict):
        self.cfg, self.stats = cfg, stats

    def quantize(self, graph: ir.Graph, lin: qdq.Linear, w: Callable[[], np.ndarray], act_absmax: float) -> None:
        raise NotImplementedError

    def fake_input(self, x: np.ndarray, absmax: float) -> np.ndarray:
        """x as the engine sees it after the static activation Q/DQ."""
        raise NotImplementedError

    def fake_weight(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def smoothing(self, lins: list[qdq.Linear], absmax: np.ndarray, sink) -> np.ndarray | None:
        """s [K] for alpha (fixed, or searched per layer on a 0.05 grid against the fp32 output)."""
        alpha = getattr(self.cfg, "alpha", None)
        if alpha is None:
            return None
        weights = [lin.read() for lin in lins]
        w_max = sink.constrain(np.max([np.abs(w).max(axis=1) for w in weights], axis=0), np.max)  # [K]
        a_max = sink.constrain(absmax, np.max)  # equal on channels that must share one scale

        def scales(a: float) -> np.ndarray:
            s = np.maximum(a_max, 1e-5) ** a / np.maximum(w_max, 1e-5) ** (1 - a)
            return np.clip(s, 1e-5, None).astype(np.float32)

        if alpha != "search":
            return scales(alpha)
        x = self.stats[lins[0].node.name].rows.astype(np.float32)  # [T, K]
        # no smoothing (s = 1) is a candidate too: alpha = 0 still divides by max|W|
        candidates = [np.ones_like(absmax, dtype=np.float32)] + [scales(a) for a in np.arange(0.0, 1.0001, 0.05)]

        def product(i: int, wc: np.ndarray) -> np.ndarray:  # float64, so the choice does not depend on the CPU's BLAS
            s = candidates[i]
            xq = self.fake_input(x / s, float((absmax / s).max())).astype(np.float64)
            return xq @ self.fake_weight(wc * s[:, None]).astype(np.float64)

        return candidates[int(stable_argmin(search_losses(x, weights, len(candidates), product)))]

    def run(self, model: ir.Model) -> PassResult:
        graph, done, smoothed = model.graph, 0, 0
        for lins in reversed(groups(graph)):  # last first: folds into `up` land before up is quantised
            todo = list(scheme_linears(graph, self.cfg, lins))
            if not todo:
                continue
            absmax = self.stats[todo[0].node.name].absmax.astype(np.float32)  # [K]
            sink = expect_sink(todo[0].node.inputs[0], todo[0].node.name) if len(todo) == len(lins) and private(todo) else None
            s = self.smoothing(todo, absmax, sink) if sink is not None else None
            if s is not None:
                fold(sink, s)
                smoothed += len(todo)
            for lin in todo:  # the weight is read (and smoothed) when the model is saved
                w = (lambda lin=lin: lin.read()) if s is None else (lambda lin=lin, s=s: lin.read() * s[:, None])
                self.quantize(graph, lin, w, float((absmax if s is None else absmax / s).max()))
                done += 1
        return PassResult(model, done > 0, [f"{done} linears quantised ({smoothed} smoothed)"])


class Int8SmoothQuant(ActivationQuantizer):
    name = "quantize_int8_sq"

    def fake_input(self, x: np.ndarray, absmax: float) -> np.ndarray:
        step = max(absmax, 1e-8) / 127.0
        return np.clip(np.rint(x / step), -127, 127) * step

    def fake_weight(self, w: np.ndarray) -> np.ndarray:
        q, scale = int8_per_channel(w)
        return q.astype(np.float32) * scale

    def quantize(self, graph: ir.Graph, lin: qdq.Linear, w: Callable[[], np.ndarray], act_absmax: float) -> None:
        qdq.use_int8(graph, lin, lambda: int8_per_channel(w()))
        qdq.quantize_input(graph, lin, max(act_absmax, 1e-8) / 127.0, ir.DataType.INT8)
