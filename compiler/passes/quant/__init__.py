"""Quantisation schemes: one module each, with a typed config selected by `scheme` in the recipe.

  int4-rtn  rtn.py         blockwise int4, round to nearest
  int4-awq  awq.py         activation-aware scales + clipping search, then blockwise int4
  int8-wo   int8_wo.py     per-channel int8 weights
  int8-sq   smoothquant.py SmoothQuant W8A8 (static per-tensor activation scales)
  fp8       fp8.py         E4M3 weights per channel + static per-tensor activation scales
  gguf      gguf.py        each linear keeps its GGUF file's grid exactly (Q4_0/1, Q4_K, Q5_*, Q6_K, Q8_0)
All emit standard QDQ (qdq.py); calibration statistics come from calibration.py.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from compiler.passes.quant.awq import Int4Awq, Int4AwqConfig
from compiler.passes.quant.fp8 import Fp8, Fp8Config
from compiler.passes.quant.gguf import GgufConfig, GgufGrids
from compiler.passes.quant.int8_wo import Int8WeightOnly, Int8WoConfig
from compiler.passes.quant.rtn import Int4Rtn, Int4RtnConfig
from compiler.passes.quant.smoothquant import Int8SmoothQuant, Int8SqConfig

QuantConfig = Annotated[Union[Int4RtnConfig, Int4AwqConfig, Int8WoConfig, Int8SqConfig, Fp8Config, GgufConfig], Field(discriminator="scheme")]

_PASSES = {"int4-rtn": Int4Rtn, "int4-awq": Int4Awq, "int8-wo": Int8WeightOnly, "int8-sq": Int8SmoothQuant,
           "fp8": Fp8, "gguf": GgufGrids}


SCHEMES = tuple(_PASSES)  # what a recipe's quantization.scheme may say


def scheme_pass_name(cfg) -> str:
    """The name the scheme's pass goes by in the pipeline (quantize_int4_awq, ...)."""
    return _PASSES[cfg.scheme].name


def needs_calibration(cfg) -> bool:
    return getattr(cfg, "calibration", None) is not None


def quantizer(cfg, stats: dict | None = None, gguf=None, int8_activations: bool = False, signed_int4: bool = False):
    """The quantisation pass for `cfg` (stats: calibration statistics per MatMul name; gguf: the
    GgufSource of the gguf scheme; int8_activations: the engine's MatMulNBits runs at level 4;
    signed_int4: the backend takes only signed int4 blocks (TensorRT))."""
    cls = _PASSES[cfg.scheme]
    if cfg.scheme == "gguf":
        return cls(cfg, gguf, int8_activations, signed_int4)
    return cls(cfg, stats) if needs_calibration(cfg) else cls(cfg)
