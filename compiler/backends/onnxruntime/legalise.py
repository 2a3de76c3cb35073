"""Legalisation for ONNX Runtime's CPU provider: swap standard-op subgraphs for its fused kernels.

Each rewrite lives in its own file (pattern, replacement, check). Applied only for the
`contrib` graph flavour; the standard-op graph (what the parity tests also run) stays
available with `onnxruntime.graph: standard` in the recipe.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from compiler.backends.onnxruntime import embedding, gqa, skip_norm

log = logging.getLogger("kiln.backends.onnxruntime")


def legalise(model: ir.Model, cfg) -> ir.Model:
    graph = model.graph
    matches = [m for m in map(gqa.match, list(graph)) if m is not None]
    refused = [(m, why) for m in matches if (why := gqa.check(m, cfg.head_dim))]
    for m, why in refused:
        log.warning("GroupQueryAttention: %s refused: %s", m.attention.name, why)
    usable = [m for m in matches if not gqa.check(m, cfg.head_dim)]
    if usable:
        lens = gqa.lengths(graph, next(v for v in graph.inputs if v.name == "position_ids"))
        for m in usable:
            gqa.replace(graph, m, (cfg.num_heads, cfg.num_kv_heads), lens)
    _skip_norms(graph)
    for node in list(graph):
        transpose = embedding.match(node)
        if transpose is not None and embedding.check(node) is None:
            embedding.replace(graph, node, transpose)
    model.opset_imports["com.microsoft"] = 1
    RemoveUnusedNodesPass()(model)
    return model


def _skip_norms(graph: ir.Graph) -> None:
    for norm in list(graph):
        add = skip_norm.match(norm)
        if add is None:
            continue
        why = skip_norm.check(norm, add)
        if why:
            log.warning("SkipSimplifiedLayerNormalization: %s refused: %s", norm.name, why)
            continue
        skip_norm.replace(graph, norm, add)
