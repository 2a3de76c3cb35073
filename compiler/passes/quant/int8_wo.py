"""int8-wo: symmetric per-output-channel int8 weights, activations stay float."""

from __future__ import annotations

from typing import Literal

import onnx_ir as ir

from compiler.passes.quant import qdq
from compiler.passes.quant.base import SchemeConfig, WeightQuantizer, int8_per_channel


class Int8WoConfig(SchemeConfig):
    scheme: Literal["int8-wo"]


class Int8WeightOnly(WeightQuantizer):
    name = "quantize_int8_wo"

    def quantize_linear(self, graph: ir.Graph, lin: qdq.Linear) -> None:
        qdq.use_int8(graph, lin, lambda lin=lin: int8_per_channel(lin.read()))
