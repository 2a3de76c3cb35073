"""fp8: E4M3 weights with per-output-channel scales and static per-tensor E4M3 activations.

Weight scale = max|W_:,n| / 448 (E4M3's largest normal); activation scale = max|X| over
calibration / 448, quantised with saturation. Before that, SmoothQuant-style migration (alpha
searched per layer by default) moves activation outliers into the weights. Standard QDQ with float8e4m3fn, which ONNX
Runtime runs on CPU (dequantised to fp32) and TensorRT maps to FP8 layers.
The optional fp8/int8 KV cache is not implemented (the recipe refuses anything but none).
"""

from __future__ import annotations

from typing import Callable, Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
from pydantic import Field

from compiler.passes.quant import qdq
from compiler.passes.quant.base import Calibration, SchemeConfig, per_channel
from compiler.passes.quant.smoothquant import ActivationQuantizer

E4M3_MAX = 448.0


class Fp8Config(SchemeConfig):
    scheme: Literal["fp8"]
    # SmoothQuant-style migration before fp8 activations: a fixed alpha, "search" per layer, or none
    alpha: float | Literal["search"] | None = Field("search")
    calibration: Calibration = Calibration()
    kv_cache: Literal["none"] = "none"


def fp8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] -> (q float8_e4m3fn [K, N], scale [N] float32)."""
    return per_channel(w, _fp8)


def _fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(w).max(axis=0) / E4M3_MAX
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return np.clip(w / scale, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn), scale


class Fp8(ActivationQuantizer):
    name = "quantize_fp8"

    def fake_input(self, x: np.ndarray, absmax: float) -> np.ndarray:
        scale = max(absmax, 1e-8) / E4M3_MAX
        return np.clip(x / scale, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale

    def fake_weight(self, w: np.ndarray) -> np.ndarray:
        q, scale = fp8_per_channel(w)
        return q.astype(np.float32) * scale

    def quantize(self, graph: ir.Graph, lin: qdq.Linear, w: Callable[[], np.ndarray], act_absmax: float) -> None:
        qdq.use_fp8(graph, lin, lambda: fp8_per_channel(w()))
        qdq.quantize_input(graph, lin, max(act_absmax, 1e-8) / E4M3_MAX, ir.DataType.FLOAT8E4M3FN)
