"""fuse_sample: put kiln::Sample at the end of a decoder, so each step can return token ids.

Pattern:      the graph output `logits` [B, K, V]
Replacement:  new inputs temperature [B], top_k [B] (int64), top_p [B], draws [B]; the output
              `next_tokens` [B] = kiln::Sample(logits[:, -1, :], ...). `logits` stays an output
              (evaluation reads it); the runtime binds only `next_tokens` when it generates.
Check:        refuses a graph without a 3-D `logits` output or one already sampling.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.passes.base import Pass, PassResult
from plugins.spec import DOMAIN

INPUTS = (("temperature", ir.DataType.FLOAT), ("top_k", ir.DataType.INT64), ("top_p", ir.DataType.FLOAT),
          ("draws", ir.DataType.FLOAT))
OUTPUT = "next_tokens"


def check(graph: ir.Graph) -> str | None:
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    if logits is None:
        return "the graph has no `logits` output"
    if any(v.name == OUTPUT for v in graph.outputs):
        return "the graph already samples"
    if logits.shape is not None and len(logits.shape) != 3:
        return f"logits has shape {logits.shape}, expected [B, K, V]"
    return None


class FuseSample(Pass):
    """Rewrite the sample plugin's pattern into its kiln op (the plugin template's example)."""

    name = "fuse_sample"

    def run(self, model: ir.Model) -> PassResult:
        from plugins.sample import PLUGIN

        g = model.graph
        why = check(g)
        if why:
            return PassResult(model, False, [f"refused: {why}"])
        logits = next(v for v in g.outputs if v.name == "logits")
        params = [ir.Value(name=n, type=ir.TensorType(t), shape=ir.Shape(["batch"])) for n, t in INPUTS]
        g.inputs.extend(params)
        last_idx = ir.Value(name="/sample/last_index", const_value=ir.Tensor(np.array(-1, dtype=np.int64)),
                            type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
        g.register_initializer(last_idx)
        last = ir.Node("", "Gather", [logits, last_idx], attributes=[ir.AttrInt64("axis", 1)], name="/sample/last_position")
        last.outputs[0].name = "/sample/last_position_output_0"  # [B, V]
        node = ir.Node(DOMAIN, PLUGIN.op_type, [last.outputs[0], *params], name="/sample/Sample")
        tokens = node.outputs[0]
        tokens.name, tokens.type, tokens.shape = OUTPUT, ir.TensorType(ir.DataType.INT64), ir.Shape(["batch"])
        g.extend([last, node])
        g.outputs.append(tokens)
        g.opset_imports.setdefault(DOMAIN, 1)
        fn = ir.serde.deserialize_function(PLUGIN.function())
        model.functions.setdefault(fn.identifier(), fn)
        return PassResult(model, True, ["next_tokens = kiln::Sample(logits[:, -1])"])
