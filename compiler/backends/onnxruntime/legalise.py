"""Legalisation for ONNX Runtime's CPU provider: swap standard-op subgraphs for its fused kernels.

Each rewrite lives in its own file as onnxscript rewriter rules (pattern, replacement, check);
onnxscript's own rule is used where it does the job (the skip norm), ours where none of theirs
matches kiln's graph (each file says why). Applied only for the `contrib` graph flavour; the
standard-op graph (what the parity tests also run) stays available with
`onnxruntime.graph: standard` in the recipe.
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter._rewrite_rule import RULE_NAME_TAG

from compiler.backends.onnxruntime import embedding, gqa, skip_norm
from compiler.passes.base import Pass, PassResult

log = logging.getLogger("kiln.backends.onnxruntime")


class LegaliseOnnxRuntime(Pass):
    """Swap attention, residual norms and the embedding for ONNX Runtime's contrib kernels."""

    name = "legalise_onnxruntime"

    def __init__(self, cfg):
        self.cfg = cfg  # the model config as this graph sees it (a rank's heads in a tp build)

    def run(self, model: ir.Model) -> PassResult:
        counts, notes = legalise(model, self.cfg)
        notes.insert(0, ", ".join(f"{n} {op}" for op, n in counts.items()))
        return PassResult(model, any(counts.values()), notes)


def legalise(model: ir.Model, cfg) -> tuple[dict[str, int], list[str]]:
    """Rewrite model in place; returns (contrib nodes per op type, why each refused match was refused)."""
    graph, refused = model.graph, []
    rule_sets = [*gqa.rules(graph, cfg, refused), *skip_norm.rules(refused), *embedding.rules()]
    for rules in rule_sets:
        rules.apply_to_model(model)
    _name_unnamed(graph)
    model.opset_imports["com.microsoft"] = 1
    RemoveUnusedNodesPass()(model)
    counts = Counter(n.op_type for n in graph if n.domain == "com.microsoft" or n.op_type == "SimplifiedLayerNormalization")
    counts["Gather of embedding rows"] = sum(1 for n in graph if n.metadata_props.get(RULE_NAME_TAG) == "EmbeddingRows")
    for note in refused:
        log.warning("%s", note)
    return dict(sorted(counts.items())), refused


def _name_unnamed(graph: ir.Graph) -> None:
    """onnxscript's own rules name their nodes `node_<Op>_<n>`: name each after the scope of the
    value it replaced (which keeps its name), `/layers.3/post_attention_layernorm/SkipSimplifiedLayerNormalization`."""
    for node in graph:
        generated = not node.name or node.name.startswith(f"node_{node.op_type}")
        if generated and RULE_NAME_TAG in node.metadata_props and node.outputs[0].name:
            node.name = f"{node.outputs[0].name.rpartition('/')[0]}/{node.op_type}"
