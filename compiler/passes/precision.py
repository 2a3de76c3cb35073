"""to_half: the fp32 IR as an fp16 or bf16 graph for GPU execution providers.

Every float tensor becomes the half type: weights (converted lazily, one tensor at a time, as
they are written), small constants, the KV-cache inputs/outputs and activations. Numerics that
need range keep fp32 inside the op: RMSNormalization and LayerNormalization accumulate in fp32
(`stash_type` 1), Attention takes its softmax in fp32 (`softmax_precision` FLOAT). The logits
output is cast back to fp32, so the runtime's sampling and kiln eval see the same dtype.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from compiler.passes.base import Pass, PassResult

_NUMPY = {ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}


class ToHalf(Pass):
    """Make every float tensor fp16 or bf16 (norms and softmax accumulate in fp32, logits stay fp32)."""

    def __init__(self, dtype: ir.DataType):
        self.dtype = dtype
        self.name = f"to_{dtype.name.lower()}"

    def _tensor(self, t):
        """The tensor in the half type; lazy weights stay lazy."""
        np_dtype = _NUMPY[self.dtype]
        if isinstance(t, ir.LazyTensor):
            return ir.LazyTensor(lambda t=t: ir.Tensor(np.asarray(t.numpy()).astype(np_dtype)), dtype=self.dtype,
                                 shape=t.shape, name=t.name)
        return ir.Tensor(np.asarray(t.numpy()).astype(np_dtype), dtype=self.dtype, name=t.name)

    def _retype(self, v: ir.Value) -> bool:
        if v is not None and v.dtype == ir.DataType.FLOAT:
            v.type = ir.TensorType(self.dtype)
            return True
        return False

    def run(self, model: ir.Model) -> PassResult:
        graph, n = model.graph, 0
        for v in graph.initializers.values():
            if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT:
                v.const_value = self._tensor(v.const_value)
                n += self._retype(v)
        for v in graph.inputs:
            n += self._retype(v)
        for node in graph:
            self._node(node)
            for out in node.outputs:
                n += self._retype(out)
        self._logits_in_fp32(graph)
        return PassResult(model, n > 0, [f"{n} float tensors now {self.dtype.name.lower()}"])

    def _node(self, node: ir.Node) -> None:
        if node.op_type in ("RMSNormalization", "LayerNormalization"):
            node.attributes["stash_type"] = ir.AttrInt64("stash_type", 1)
        elif node.op_type == "Attention" and not node.domain:
            node.attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", ir.DataType.FLOAT.value)
        elif node.op_type == "Cast" and node.attributes.get_int("to", 0) == ir.DataType.FLOAT.value:
            node.attributes["to"] = ir.AttrInt64("to", self.dtype.value)

    def _logits_in_fp32(self, graph: ir.Graph) -> None:
        for i, out in enumerate(list(graph.outputs)):
            if out.name != "logits":
                continue
            cast = ir.Node("", "Cast", [out], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT.value)], name="/lm_head/Cast_fp32")
            graph.append(cast)
            y = cast.outputs[0]
            y.type, y.shape = ir.TensorType(ir.DataType.FLOAT), out.shape
            out.name, y.name = "logits_half", "logits"
            graph.outputs[i] = y
