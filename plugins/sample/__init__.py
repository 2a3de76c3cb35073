"""sample: greedy / temperature / top-k / top-p sampling fused at the end of the engine, so each
decode step moves B token ids off the device instead of B x V logits (SmolLM2: 8 bytes instead
of 196 KB per row)."""

from __future__ import annotations

from plugins.sample import schema
from plugins.sample.decomposition import decomposition
from plugins.sample.reference import reference
from plugins.spec import Plugin


PLUGIN = Plugin(
    name="sample", op_type=schema.OP_TYPE, doc=__doc__.strip(), inputs=schema.INPUTS, outputs=schema.OUTPUTS,
    attrs=schema.ATTRS, infer=schema.infer, reference=reference, decomposition=decomposition,
    kernel="plugins.sample.kernel:kernel",
    rewrite="plugins.sample.rewrite:FuseSample", bandwidth_bound=False, engine_io=True,
)
