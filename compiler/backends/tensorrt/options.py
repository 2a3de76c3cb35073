"""The recipe's `tensorrt:` section (typed; importing it needs no TensorRT)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compiler.config_base import StrictModel

Target = Literal["SM75", "SM80", "SM86", "SM89", "SM120", "SM121"]


class Profile(StrictModel):
    """One optimisation profile: [min, opt, max] of batch and input length (tokens per step).
    The KV cache length is the recipe's max_seq; max input length defaults to it."""

    batch: tuple[int, int, int] | None = Field(None, description="default [1, 1, max_batch]")
    input_len: tuple[int, int, int] | None = Field(None, description="default [1, 128, max_seq]")

    @model_validator(mode="after")
    def _ordered(self):
        for name in ("batch", "input_len"):
            v = getattr(self, name)
            if v is not None and not (1 <= v[0] <= v[1] <= v[2]):
                raise ValueError(f"{name} must be [min, opt, max] with 1 <= min <= opt <= max")
        return self


class TensorRTOptions(StrictModel):
    module: Literal["auto", "tensorrt_rtx", "tensorrt"] = "auto"
    precision: Literal["float16", "bfloat16"] = "float16"
    targets: list[Target] = Field(["SM80", "SM86", "SM89", "SM120"], min_length=1,
                                  description="compute capabilities (TensorRT-RTX; Hopper SM90 is not one)")
    opt_level: int = Field(3, ge=0, le=5, description="builder optimisation level")
    profiles: list[Profile] = Field([Profile()], min_length=1)
    timing_cache: str | None = Field("~/.cache/kiln/trt-timing.cache",
                                     description="reused between builds (tensorrt; TensorRT-RTX has none); null disables it")
    verbose_log: bool = Field(False, description="keep the builder's VERBOSE log in build.log")
