"""fuse_paged_attention: kiln's static-cache attention -> kiln::PagedAttention, rows of any kv dtype.

Pattern (compiler/frontend/layers.cached_attention), per layer:
    present_k = TensorScatter(past_k, Transpose(Reshape(k)), write_index)       k [B, S, Nkv*D]
    present_v = TensorScatter(past_v, Transpose(Reshape(v)), write_index)
    y = Reshape(Transpose(Attention(Transpose(Reshape(q)), present_k, present_v, mask)))
Replacement: y, present_k, present_v = PagedAttention(q, k, v, past_k, past_v, position_ids) with
the layer's heads, scale and window; the head split and merge transposes are gone (the kernel
reads [B, S, N*D]). With int8 / fp8 rows the cache inputs and outputs change type, and each
layer gains `past_key_scale.{i}` / `past_value_scale.{i}` inputs and `present_*_scale.{i}` outputs.
Check: refuses a mask that is not the graph's causal or sliding-window mask, a cache update off
the sequence axis, or an Attention with softcap or its own causal flag.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from compiler.backends.onnxruntime.gqa import CAUSAL, cached_attention, refusal, window_of
from compiler.errors import KilnError
from compiler.passes.base import Pass, PassResult
from plugins.paged_attention.schema import KV_DTYPES, OP_TYPE, SCALED
from plugins.spec import DOMAIN

ROW_TYPES = {name: ir.DataType(t) for name, t in KV_DTYPES.items()}  # the schema's row types (TensorProto enums)


class _Rule(pattern.RewriteRuleClassBase):
    def __init__(self, heads: tuple[int, int], positions: ir.Value, kv_dtype: str, refused: list[str]):
        super().__init__("PagedAttention")
        self.heads, self.positions, self.kv_dtype, self.refused = heads, positions, kv_dtype, refused

    def pattern(self, op, q, k, v, past_k, past_v, write_index, mask, q_shape, k_shape, v_shape, y_shape):
        return cached_attention(op, q, k, v, past_k, past_v, write_index, mask, q_shape, k_shape, v_shape, y_shape)

    def check(self, context, mask, present_k, present_v, attended, **_) -> pattern.MatchResult:
        node = attended.producer()
        why = refusal(mask, present_k, present_v)
        if why is None and (node.attributes.get_float("softcap", 0.0) or node.attributes.get_int("is_causal", 0)):
            why = "Attention has softcap or is_causal, which the kernel does not apply"
        if why:
            self.refused.append(f"PagedAttention: {node.name} refused: {why}")
            return pattern.MatchResult().fail(why)
        return pattern.MatchResult()

    def rewrite(self, op, q, k, v, past_k, past_v, mask, attended, **_):
        nq, nkv = self.heads
        window = window_of(mask)
        attrs = {"num_heads": nq, "kv_num_heads": nkv, "scale": attended.producer().attributes.get_float("scale", 0.0),
                 "window": 0 if window == CAUSAL else window, "kv_dtype": self.kv_dtype}
        name = attended.producer().name.replace("/Attention", f"/{OP_TYPE}")
        return op.PagedAttention(q, k, v, past_k, past_v, self.positions, **attrs, _domain=DOMAIN, _outputs=3, _name=name)


class FusePagedAttention(Pass):
    """Every layer's cached attention -> kiln::PagedAttention with rows of `kv_dtype`."""

    name = "fuse_paged_attention"

    def __init__(self, kv_dtype: str, heads: tuple[int, int]):
        self.kv_dtype, self.heads = kv_dtype, heads  # heads: (Nq, Nkv) of the graph (a rank's, in a tp build)

    def run(self, model: ir.Model) -> PassResult:
        g, refused = model.graph, []
        positions = next((v for v in g.inputs if v.name == "position_ids"), None)
        if positions is None or not any(n.op_type == "TensorScatter" for n in g):
            return PassResult(model, False, ["refused: the graph has no KV cache"])
        pattern.RewriteRuleSet([_Rule.rule(self.heads, positions, self.kv_dtype, refused)]).apply_to_model(model)
        nodes = [n for n in g if n.domain == DOMAIN and n.op_type == OP_TYPE]
        left = [n.name for n in g if n.op_type == "Attention"]
        if left:  # a layer left on TensorScatter + Attention would read rows the kernel session never binds
            raise KilnError(f"kv_cache attention kiln: {len(left)} attention nodes could not become kiln::PagedAttention "
                            f"({'; '.join(refused) or left[0]})", "build with kv_cache: {dtype: fp32, attention: onnxruntime}")
        if nodes:
            _retype_rows(g, nodes, self.kv_dtype)
            model.opset_imports.setdefault(DOMAIN, 1)
        return PassResult(model, bool(nodes), [f"{len(nodes)} PagedAttention nodes, {self.kv_dtype} rows", *refused])


def _retype_rows(g: ir.Graph, nodes: list[ir.Node], kv_dtype: str) -> None:
    """Cache inputs and outputs take the rows' element type; quantised rows gain their scales."""
    row = ROW_TYPES[kv_dtype]
    for node in nodes:
        for v in (node.inputs[3], node.inputs[4], node.outputs[1], node.outputs[2]):
            v.type = ir.TensorType(row)
        if kv_dtype not in SCALED:
            continue
        for past in (node.inputs[3], node.inputs[4]):
            shape = ir.Shape([*list(past.shape)[:3], 1])
            scale = ir.Value(name=past.name.replace("past_key.", "past_key_scale.").replace("past_value.", "past_value_scale."),
                             type=ir.TensorType(ir.DataType.FLOAT), shape=shape)
            g.inputs.append(scale)
            node.resize_inputs(len(node.inputs) + 1)
            node.replace_input_with(len(node.inputs) - 1, scale)
        node.resize_outputs(5)
        for i, past in ((3, node.inputs[6]), (4, node.inputs[7])):
            out = node.outputs[i]
            out.name, out.type, out.shape = past.name.replace("past_", "present_"), ir.TensorType(ir.DataType.FLOAT), past.shape
            g.outputs.append(out)
