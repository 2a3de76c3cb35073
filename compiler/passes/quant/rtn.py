"""int4-rtn: round-to-nearest blockwise int4 weights (symmetric or asymmetric), no calibration."""

from __future__ import annotations

from typing import Literal

import onnx_ir as ir

from compiler.passes.quant import qdq
from compiler.passes.quant.base import SchemeConfig, WeightQuantizer
from compiler.passes.quant.int4 import quantize


class Int4RtnConfig(SchemeConfig):
    scheme: Literal["int4-rtn"]
    group_size: Literal[32, 64, 128] = 128
    symmetric: bool = True


class Int4Rtn(WeightQuantizer):
    name = "quantize_int4_rtn"

    def quantize_linear(self, graph: ir.Graph, lin: qdq.Linear) -> None:
        g, sym = self.cfg.group_size, self.cfg.symmetric
        qdq.use_int4(graph, lin, lambda: quantize(lin.read(), g, sym), g, sym)
