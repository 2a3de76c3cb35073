"""The paged_attention plugin's description (schema, reference, decomposition, rewrite): apart from
the package's __init__ so that the runtime's import of `plugins.paged_attention.cpu` stays free of
onnx and the build side."""

from __future__ import annotations

from plugins.paged_attention import schema
from plugins.paged_attention.decomposition import decomposition
from plugins.paged_attention.reference import reference
from plugins.spec import Plugin

DOC = ("paged_attention: the engine's attention over the KV rows kiln's engine core owns, run on the CPU by kiln's own "
       "compiled kernel between ONNX Runtime graph parts, with float32, float16, bfloat16, int8 or fp8 rows.")


def op_reference(q, k, v, past_k, past_v, position_ids, past_k_scale=None, past_v_scale=None, num_heads=1,
                 kv_num_heads=1, scale=0.0, window=0, kv_dtype="float32"):
    """The op's outputs (y, present rows, present scales) from copies of its inputs."""
    rows = [past_k.copy(), past_v.copy(), *(None if s is None else s.copy() for s in (past_k_scale, past_v_scale))]
    y = reference(q, k, v, *rows, position_ids, num_heads, kv_num_heads, scale, window, kv_dtype, inplace=True)
    return (y.astype(q.dtype), *(r for r in rows if r is not None))


PLUGIN = Plugin(name="paged_attention", op_type=schema.OP_TYPE, doc=DOC, inputs=schema.INPUTS, outputs=schema.OUTPUTS,
                attrs=schema.ATTRS, infer=schema.infer, reference=op_reference, decomposition=decomposition, kernel=None,
                rewrite="plugins.paged_attention.rewrite:FusePagedAttention", engine_io=True)
