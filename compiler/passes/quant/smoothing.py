"""Per-input-channel smoothing shared by AWQ and SmoothQuant: X W = (X / s)(s W).

`sink_of(x)` finds the constant that can absorb 1/s for activation x: the RMSNorm scale that
produced it, or the weight columns producing `up` in `act(gate) * up`. `fold` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler.passes.quant import qdq


@dataclass
class Sink:
    """A constant whose slice [start:start+K] along `axis` is divided by s."""

    value: ir.Value
    axis: int  # 0 for a norm scale [K]; 1 for weight columns [H, N]
    start: int


def sink_of(x: ir.Value) -> Sink | None:
    node = x.producer()
    if node is None:
        return None
    if node.op_type == "RMSNormalization" and node.inputs[1].const_value is not None:
        return Sink(node.inputs[1], 0, 0)
    if node.op_type == "Mul":  # act(gate) * up: scale the weight columns that produce `up`
        up = node.inputs[1]
        prod = up.producer()
        if prod is not None and prod.op_type == "Split" and prod.inputs[0].producer() is not None:
            mm, j = prod.inputs[0].producer(), list(prod.outputs).index(up)
            sizes = prod.inputs[1].const_value.numpy() if len(prod.inputs) > 1 and prod.inputs[1] is not None else None
            if mm.op_type == "MatMul" and mm.inputs[1].const_value is not None and sizes is not None:
                return Sink(mm.inputs[1], 1, int(sizes[:j].sum()))
        if prod is not None and prod.op_type == "MatMul" and prod.inputs[1].const_value is not None:
            return Sink(prod.inputs[1], 1, 0)
    return None


def fold(sink: Sink, s: np.ndarray) -> None:
    arr = np.array(sink.value.const_value.numpy(), dtype=np.float32)
    if sink.axis == 0:
        arr = arr / s
    else:
        arr[:, sink.start:sink.start + len(s)] /= s
    set_const(sink.value, arr)


def set_const(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.Tensor(np.ascontiguousarray(array, dtype=np.float32), name=value.name)


def groups(graph: ir.Graph) -> list[list[qdq.Linear]]:
    """Linears grouped by the activation they read, in graph order. A weight shared with other
    nodes (a tied embedding table) is first given to the MatMul as its own value, so scaling it
    leaves the lookup alone."""
    out: dict[int, list[qdq.Linear]] = {}
    for lin in qdq.linears(graph):
        if len(list(lin.weight.uses())) > 1:
            lin = _untie(graph, lin)
        out.setdefault(id(lin.node.inputs[0]), []).append(lin)
    return list(out.values())


def _untie(graph: ir.Graph, lin: qdq.Linear) -> qdq.Linear:
    name = f"{lin.scope}/weight".lstrip("/").replace("/", ".")
    own = ir.Value(name=name, type=lin.weight.type, shape=lin.weight.shape, const_value=lin.weight.const_value)
    graph.register_initializer(own)
    lin.node.replace_input_with(1, own)
    return qdq.Linear(lin.node, own)


def private(lins: list[qdq.Linear]) -> bool:
    """True when each weight feeds only its own MatMul (a tied embedding table must not be scaled)."""
    return all(len(list(lin.weight.uses())) == 1 for lin in lins)
