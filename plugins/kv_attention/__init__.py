"""kv_attention: attention over a static KV cache that keeps each sequence's real length and an
optional sliding window, where TensorRT's parser drops `nonpad_kv_seqlen` and its attention
layer has no window."""

from __future__ import annotations

from plugins.kv_attention import schema
from plugins.kv_attention.decomposition import decomposition
from plugins.kv_attention.reference import reference
from plugins.spec import Plugin


PLUGIN = Plugin(
    name="kv_attention", op_type=schema.OP_TYPE, doc=__doc__.strip(), inputs=schema.INPUTS, outputs=schema.OUTPUTS,
    attrs=schema.ATTRS, infer=schema.infer, reference=reference, decomposition=decomposition,
    kernel="plugins.kv_attention.kernel:kernel",
    bandwidth_bound=True,
)
