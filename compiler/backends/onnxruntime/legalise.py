"""Legalisation for ONNX Runtime's CPU provider (placeholder until measured: returns the graph)."""

from __future__ import annotations

import onnx_ir as ir


def legalise(model: ir.Model, cfg) -> ir.Model:
    return model
