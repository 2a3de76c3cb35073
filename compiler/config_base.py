"""The base of every typed config section a recipe holds (recipe, quantization, tensorrt).

A leaf module (only pydantic): unknown keys are refused, so a misspelt field fails the recipe
instead of being ignored, and a parsed section is frozen.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


__all__ = ["StrictModel"]
