"""rmsnorm_residual: residual add + RMSNorm in one pass over memory (decode is bandwidth-bound:
the unfused pair writes the sum, then reads it back for the norm)."""

from __future__ import annotations

from plugins.rmsnorm_residual import schema
from plugins.rmsnorm_residual.decomposition import decomposition
from plugins.rmsnorm_residual.reference import reference
from plugins.spec import Plugin


PLUGIN = Plugin(
    name="rmsnorm_residual", op_type=schema.OP_TYPE, doc=__doc__.strip(), inputs=schema.INPUTS, outputs=schema.OUTPUTS,
    attrs=schema.ATTRS, infer=schema.infer, reference=reference, decomposition=decomposition,
    kernel="plugins.rmsnorm_residual.kernel:kernel",
    rewrite="plugins.rmsnorm_residual.rewrite:FuseRmsNormResidual",
)
