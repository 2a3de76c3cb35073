"""Backends, in one explicit registry: a recipe's `backend:` -> the class that compiles for it.

Each implements the Backend protocol of base.py (check, emit_rank, engine, record) and is made
as Class(recipe, facts, num_heads, progress); base.emit is the one rank loop of every build.
Classes load on first use: TensorRT's module is imported only by builds that ask for it.
"""

from __future__ import annotations

from typing import Callable

from compiler.backends.base import Backend, ModelFacts, emit  # noqa: F401


def _onnxruntime() -> type:
    from compiler.backends.onnxruntime.backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend


def _tensorrt() -> type:
    from compiler.backends.tensorrt.backend import TensorRTBackend

    return TensorRTBackend


REGISTRY: dict[str, Callable[[], type]] = {"onnxruntime": _onnxruntime, "tensorrt": _tensorrt}


def make(recipe, facts: ModelFacts, num_heads: int, progress: bool) -> Backend:
    """The recipe's backend, made for one build (facts: the model's, a rank's in a tp build)."""
    return REGISTRY[recipe.backend]()(recipe, facts, num_heads, progress)
