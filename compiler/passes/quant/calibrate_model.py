"""Calibration of a model for a recipe: builds the calibration graph and collects statistics.

The calibration graph is the model's own graph built with max_seq = calibration seq_len and run
through the passes the build's pipeline gives it (build/pipeline.py: calibration_plan), so its
MatMul names are exactly those the quantiser sees in the engine graph. Statistics are collected
layer by layer (calibration.collect).
"""

from __future__ import annotations

from compiler.frontend.checkpoint import Checkpoint
from compiler.passes import PassManager
from compiler.passes.base import Pass
from compiler.passes.quant.calibration import CalibrationConfig, calibration_tokens, collect


def calibrate(recipe, arch, cfg, ckpt: Checkpoint, passes: list[Pass], progress: bool = True) -> dict:
    """Statistics for the recipe's calibration settings on the graph `passes` make (the build
    caches them: build/pipeline.py)."""
    return _collect(recipe, arch, cfg, ckpt, passes, progress)


def _collect(recipe, arch, cfg, ckpt: Checkpoint, passes: list[Pass], progress: bool) -> dict:
    cal = recipe.quantization.calibration
    cc = CalibrationConfig(source=cal.source, samples=cal.samples, seq_len=cal.seq_len)
    tokens = calibration_tokens(ckpt.root / "tokenizer.json", cc)  # [samples, seq_len]
    graph = PassManager(passes).run(arch.build(cfg, ckpt, cal.seq_len))
    return collect(graph, tokens, progress=progress)
