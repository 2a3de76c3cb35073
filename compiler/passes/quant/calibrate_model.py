"""Calibration of a model for a recipe: builds the calibration graph and collects statistics.

The calibration graph is the model's own graph built with max_seq = calibration seq_len and
the recipe's passes, so its MatMul names are exactly those the quantiser sees in the engine
graph. Statistics are collected layer by layer (calibration.collect).
"""

from __future__ import annotations

from compiler.frontend.checkpoint import Checkpoint
from compiler.passes import PassManager, make
from compiler.passes.quant.calibration import CalibrationConfig, calibration_tokens, collect


def calibrate(recipe, arch, cfg, ckpt: Checkpoint, progress: bool = True) -> dict:
    cal = recipe.quantization.calibration
    cc = CalibrationConfig(source=cal.source, samples=cal.samples, seq_len=cal.seq_len)
    tokens = calibration_tokens(ckpt.root / "tokenizer.json", cc)  # [samples, seq_len]
    graph = PassManager(make([p for p in recipe.passes if p != "shape_inference"])).run(arch.build(cfg, ckpt, cal.seq_len))
    return collect(graph, tokens, progress=progress)
