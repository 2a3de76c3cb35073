"""rmsnorm_residual_int8: residual add + RMSNorm + int8 quantisation of the output in one pass
(the W8A8 projections of the int8-sq recipe read int8 activations)."""

from __future__ import annotations

from plugins.rmsnorm_residual_int8 import schema
from plugins.rmsnorm_residual_int8.decomposition import decomposition
from plugins.rmsnorm_residual_int8.reference import reference
from plugins.spec import Plugin


PLUGIN = Plugin(
    name="rmsnorm_residual_int8", op_type=schema.OP_TYPE, doc=__doc__.strip(), inputs=schema.INPUTS, outputs=schema.OUTPUTS,
    attrs=schema.ATTRS, infer=schema.infer, reference=reference, decomposition=decomposition,
    kernel="plugins.rmsnorm_residual_int8.kernel:kernel",
)
