"""Graph passes and their names, as recipes and `kiln build --passes` refer to them."""

from __future__ import annotations

from typing import Callable

from compiler.errors import KilnError
from compiler.passes.base import Pass, PassManager, PassResult  # noqa: F401
from compiler.passes.cleanup import DeadCodeElimination, DedupeConstants
from compiler.passes.fusions.sibling_matmul import merge_gate_up, merge_qkv
from compiler.passes.shape_inference import ShapeInference

PASSES: dict[str, Callable[[], Pass]] = {
    "merge_qkv": merge_qkv,
    "merge_gate_up": merge_gate_up,
    "dce": DeadCodeElimination,
    "dedupe_constants": DedupeConstants,
    "shape_inference": ShapeInference,
}

DEFAULT_PIPELINE = ("merge_qkv", "merge_gate_up", "dedupe_constants", "dce", "shape_inference")


def recipe_passes(names: list[str]) -> list[Pass]:
    """The recipe's graph passes (`passes:`), in its order."""
    return make(names)


def make(names: list[str] | tuple[str, ...]) -> list[Pass]:
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise KilnError(f"unknown pass {unknown[0]!r}", f"known passes: {', '.join(PASSES)}")
    return [PASSES[n]() for n in names]
