"""int4-awq: activation-aware weight quantisation (AWQ, arXiv 2306.00978), then blockwise int4.

For each set of linears that read one activation X [T, K] (after the merge passes: qkv, gate/up,
o_proj, down_proj, lm_head):
1. Scale search: s = mean|X|^a (a on a grid in [0, 1), normalised), weights W*s quantised and
   divided back; keep the a whose output X @ Wq best matches X @ W on calibration rows. The
   1/s is folded into whatever produces X: the RMSNorm scale, or the `up` columns of the weight
   feeding `act(gate) * up`. Where nothing can absorb it (o_proj under GQA), s = 1.
2. Clipping search: per block, shrink the quantisation range by r in [clip_min, 1] and keep the r
   with the least output error on the block's slice of X.
Statistics (mean |X| per channel, sampled rows) come from layer-by-layer calibration.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from compiler.passes.base import Pass, PassResult
from compiler.passes.quant import qdq
from compiler.passes.quant.base import Calibration, SchemeConfig, scheme_linears, search_losses, stable_argmin
from compiler.passes.quant.int4 import fake_quantize, quantize
from compiler.passes.quant.smoothing import expect_sink, fold, groups, private


COLUMNS = 4096  # output columns a search works on at a time


class Int4AwqConfig(SchemeConfig):
    scheme: Literal["int4-awq"]
    group_size: Literal[32, 64, 128] = 128
    symmetric: bool = True
    calibration: Calibration = Calibration()
    grid: int = Field(20, ge=1, le=100, description="scale-search steps for the exponent a in [0, 1)")
    clip_min: float = Field(0.7, gt=0, le=1, description="smallest range ratio tried by the clipping search")
    clip_steps: int = Field(7, ge=1, le=50)
    search_rows: int = Field(256, ge=8, description="calibration rows used by the searches (at most the rows kept)")


class Int4Awq(Pass):
    name = "quantize_int4_awq"

    def __init__(self, cfg: Int4AwqConfig, stats: dict):
        self.cfg, self.stats = cfg, stats
        rows = next(iter(stats.values())).rows
        self.pick = np.random.default_rng(0).permutation(len(rows))[: cfg.search_rows]

    def _fq(self, w: np.ndarray, clip=None) -> np.ndarray:
        return fake_quantize(w, self.cfg.group_size, self.cfg.symmetric, clip)

    def search_scale(self, x: np.ndarray, mean_abs: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
        """s [K] minimising sum_i |X (fq(W_i s) / s) - X W_i|^2 / (T N_i) (float64 losses,
        stable_argmin), over COLUMNS output columns at a time (a 262k-vocabulary lm_head never sits
        in memory in float64; blocks run along K, so a column slice quantises as in the whole)."""
        x64 = x.astype(np.float64)
        base = np.maximum(mean_abs, 1e-4)
        cands = []
        for a in np.arange(self.cfg.grid) / self.cfg.grid:
            s = base**a
            cands.append((s / np.sqrt(s.max() * s.min())).astype(np.float32))

        def product(i: int, wc: np.ndarray) -> np.ndarray:
            s = cands[i][:, None]
            return x64 @ (self._fq(wc * s) / s).astype(np.float64)

        return cands[int(stable_argmin(search_losses(x, weights, len(cands), product, COLUMNS)))]

    @property
    def ratios(self) -> np.ndarray:
        """The clipping search's range ratios, widest first."""
        return np.linspace(1.0, self.cfg.clip_min, self.cfg.clip_steps).astype(np.float32)

    def search_clip(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Per-block index into `ratios` [G, N] uint8 minimising each block's output error on X [T, K]
        (float64, the widest range among near-ties). An index, not the ratio: a byte per block is
        what the build keeps per linear until the weight is quantised at save time."""
        if w.shape[1] > COLUMNS:  # columns are independent: a slice at a time
            return np.concatenate([self.search_clip(x, w[:, c:c + COLUMNS]) for c in range(0, w.shape[1], COLUMNS)], axis=1)
        g, K = self.cfg.group_size, w.shape[0]
        G = -(-K // g)
        x64 = x.astype(np.float64)
        errs = []
        for r in self.ratios:
            diff = (w - self._fq(w, np.full((G, w.shape[1]), r, dtype=np.float32))).astype(np.float64)  # [K, n]
            errs.append(np.stack([((x64[:, b * g:(b + 1) * g] @ diff[b * g:(b + 1) * g]) ** 2).sum(0) for b in range(G)]))
        return stable_argmin(np.stack(errs)).astype(np.uint8)  # [G, n]

    def run(self, model: ir.Model) -> PassResult:
        graph = model.graph
        counts = {"scaled": 0, "unscaled": 0, "fp32": 0, "int8": 0}
        # Last layer first: a scale folded into `up` columns must land before those weights are
        # searched and quantised themselves. One group at a time keeps one fp32 weight in memory.
        for lins in reversed(groups(graph)):
            todo = list(scheme_linears(graph, self.cfg, lins, counts))
            if todo:
                s = self._scale(todo, len(todo) == len(lins))
                self._clip_and_quantize(graph, todo, s, counts)
        note = (f"{counts['scaled']} linears scaled + clipped, {counts['unscaled']} clipped only (no place to fold "
                f"the scale), {counts['int8']} int8, {counts['fp32']} fp32 by override")
        return PassResult(model, True, [note])

    def _rows(self, lin: qdq.Linear) -> np.ndarray:
        return self.stats[lin.node.name].rows[self.pick].astype(np.float32)  # [T, K]

    def _scale(self, lins: list[qdq.Linear], whole_group: bool) -> np.ndarray | None:
        """Search s for a group sharing one input and fold it; None when it cannot be folded."""
        sink = expect_sink(lins[0].node.inputs[0], lins[0].node.name) if whole_group and private(lins) else None
        if sink is None:
            return None
        weights = [lin.read() for lin in lins]
        s = self.search_scale(self._rows(lins[0]), sink.constrain(self.stats[lins[0].node.name].mean_abs), weights)
        fold(sink, s)
        return s

    def _clip_and_quantize(self, graph: ir.Graph, lins: list[qdq.Linear], s: np.ndarray | None, counts: dict) -> None:
        x = self._rows(lins[0]) if s is None else self._rows(lins[0]) / s
        g, sym, ratios = self.cfg.group_size, self.cfg.symmetric, self.ratios
        for lin in lins:
            scaled = (lambda lin=lin: lin.read()) if s is None else (lambda lin=lin: lin.read() * s[:, None])
            clip = self.search_clip(x, scaled())
            # quantised when the model is saved: until then the build keeps s and a byte per block
            qdq.use_int4(graph, lin, lambda w=scaled, c=clip: quantize(w(), g, sym, ratios[c]), g, sym)
            counts["scaled" if s is not None else "unscaled"] += 1
