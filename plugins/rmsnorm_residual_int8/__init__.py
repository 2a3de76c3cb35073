"""rmsnorm_residual_int8: residual add + RMSNorm + int8 quantisation of the output in one pass
(the W8A8 projections of the int8-sq recipe read int8 activations)."""

from __future__ import annotations

from plugins.rmsnorm_residual_int8 import schema
from plugins.rmsnorm_residual_int8.decomposition import decomposition
from plugins.rmsnorm_residual_int8.reference import reference
from plugins.spec import Plugin


def _kernel(x, residual, weight, scale, epsilon: float = 1e-5):
    from plugins.rmsnorm_residual.kernel import kernel  # one kernel serves both ops (QUANT)

    return kernel(x, residual, weight, epsilon=epsilon, scale=scale)


PLUGIN = Plugin(
    name="rmsnorm_residual_int8", op_type=schema.OP_TYPE, doc=__doc__.strip(), inputs=schema.INPUTS, outputs=schema.OUTPUTS,
    attrs=schema.ATTRS, infer=schema.infer, reference=reference, decomposition=decomposition, kernel=_kernel,
)
