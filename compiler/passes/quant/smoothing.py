"""Per-input-channel smoothing shared by AWQ and SmoothQuant: X W = (X / s)(s W).

`sink_of(x)` finds the constant that can absorb 1/s for activation x: the RMSNorm scale that
produced it, or the weight columns producing `up` in `act(gate) * up`. `fold` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError

from compiler.passes.quant import qdq


@dataclass
class Sink:
    """A constant whose slice [start:start+n] along `axis` is divided by s.

    `tied` [K] maps each input channel to its sink channel when several channels share one (the
    attention output of the q heads that read one KV head under GQA); s must then be equal on
    tied channels, which `constrain` enforces on the statistics the searches start from."""

    value: ir.Value
    axis: int  # 0 for a norm scale [K]; 1 for weight columns [H, N]
    start: int
    tied: np.ndarray | None = None
    bias: ir.Value | None = None  # a bias added to the sink's output columns, divided alike

    def constrain(self, stat: np.ndarray, reduce=np.mean) -> np.ndarray:
        """[K] statistic -> [K], equal within each tied set (mean or max over the set)."""
        if self.tied is None:
            return stat
        n = int(self.tied.max()) + 1
        per = np.array([reduce(stat[self.tied == j]) for j in range(n)])
        return per[self.tied]

    def own(self, s: np.ndarray) -> np.ndarray:
        """s over the input channels [K] -> s over the sink's channels."""
        if self.tied is None:
            return s
        out = np.empty(int(self.tied.max()) + 1, dtype=s.dtype)
        out[self.tied] = s
        return out


def sink_of(x: ir.Value) -> Sink | None:
    node = x.producer()
    if node is None:
        return None
    if node.op_type == "Reshape":
        return _value_sink(x)
    if node.op_type == "RMSNormalization" and node.inputs[1].const_value is not None:
        return Sink(node.inputs[1], 0, 0)
    if (node.domain, node.op_type) == ("kiln", "RmsNormResidual") and x is node.outputs[0] \
            and node.inputs[2].const_value is not None:  # plugins/rmsnorm_residual: the norm's output
        return Sink(node.inputs[2], 0, 0)
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


def expect_sink(x: ir.Value, where: str) -> Sink | None:
    """sink_of(x); None where the graph has no such constant by design (a plain activation, the
    attention output under GQA), but an error where x comes from a fused or custom op smoothing
    does not know: a scheme must not silently lose its smoothing to a rewrite that ran before it."""
    sink = sink_of(x)
    node = x.producer()
    if sink is None and node is not None and node.domain not in ("", "ai.onnx"):
        raise KilnError(f"{where}: no constant to fold the smoothing scale into: its input comes from "
                        f"{node.domain}::{node.op_type} ({node.name})",
                        "run quantisation before passes that fuse norms, or teach compiler/passes/quant/smoothing.py that op")
    return sink


def _producer_chain(v: ir.Value, ops: tuple[str, ...]) -> ir.Value | None:
    for op in ops:
        node = v.producer()
        if node is None or node.op_type != op:
            return None
        v = node.inputs[0] if op != "Attention" else node.inputs[2]  # Attention: follow V
    return v


def _value_sink(x: ir.Value) -> Sink | None:
    """o_proj's input: Reshape(Transpose(Attention(q, k, V))) with V = cache update of the v
    projection's columns. Each output channel (head h, dim d) is a mix of V channel
    (h // group, d), so 1/s can be folded into those weight columns (and bias) when s is equal
    across the q heads sharing a KV head."""
    cache = _producer_chain(x, ("Reshape", "Transpose", "Attention"))
    scatter = cache.producer() if cache is not None else None
    if scatter is None or scatter.op_type != "TensorScatter":
        return None
    v4 = scatter.inputs[1]  # [B, Nkv, S, D]
    split_heads = _producer_chain(v4, ("Transpose",))
    reshape = split_heads.producer() if split_heads is not None else None
    if reshape is None or reshape.op_type != "Reshape":
        return None
    v = reshape.inputs[0]
    past = scatter.inputs[0]  # [B, Nkv, M, D]: head counts are static on the cache, not on the -1 reshapes
    readers = [u.inputs[1] for u, _ in x.uses() if u.op_type == "MatMul" and u.inputs[1] is not None]
    if past.shape is None or not all(isinstance(n, int) for n in (past.shape[1], past.shape[3])) or not readers:
        return None
    nkv, d = past.shape[1], past.shape[3]
    k = readers[0].shape[0]  # o_proj's input width, Nq * D
    if k % (nkv * d):
        return None
    heads = k // d
    tied = ((np.arange(heads) // (heads // nkv))[:, None] * d + np.arange(d)[None, :]).reshape(-1)  # [K]
    bias = None
    prod = v.producer()
    if prod is not None and prod.op_type == "Add" and prod.inputs[1].const_value is not None:
        bias, v = prod.inputs[1], prod.inputs[0]
        prod = v.producer()
    start = 0
    if prod is not None and prod.op_type == "Split":
        j = list(prod.outputs).index(v)
        start = int(prod.inputs[1].const_value.numpy()[:j].sum())
        v = prod.inputs[0]
        prod = v.producer()
        if prod is not None and prod.op_type == "Add" and prod.inputs[1].const_value is not None:
            bias, v = prod.inputs[1], prod.inputs[0]
            prod = v.producer()
    if prod is None or prod.op_type != "MatMul" or prod.inputs[1].const_value is None:
        return None
    if bias is not None and start and bias.shape[0] != prod.inputs[1].shape[1]:
        return None
    return Sink(prod.inputs[1], 1, start, tied, bias)


def fold(sink: Sink, s: np.ndarray) -> None:
    """Divide what produces X by s (the linears reading X are multiplied by it). Lazy: the sink's
    new value is made from its old one when read, so folding into `up` columns holds no weight."""
    own = sink.own(s)
    start, prev = sink.start, sink.value.const_value

    def divided() -> np.ndarray:
        arr = np.array(prev.numpy(), dtype=np.float32)
        if sink.axis == 0:
            return arr / own
        arr[:, start:start + len(own)] /= own
        return arr

    set_lazy(sink.value, divided)
    if sink.bias is not None:
        b = np.array(sink.bias.const_value.numpy(), dtype=np.float32)
        b[start:start + len(own)] /= own
        set_const(sink.bias, b)


def set_const(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.Tensor(np.ascontiguousarray(array, dtype=np.float32), name=value.name)


def set_lazy(value: ir.Value, make) -> None:
    """value's constant becomes make() [float32, its shape], computed whenever it is read."""
    value.const_value = ir.LazyTensor(lambda: ir.Tensor(np.ascontiguousarray(make(), dtype=np.float32)),
                                      dtype=ir.DataType.FLOAT, shape=ir.Shape(list(value.shape)), name=value.name)


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
    name = lin.prefix("weight")
    own = ir.Value(name=name, type=lin.weight.type, shape=lin.weight.shape, const_value=lin.weight.const_value)
    graph.register_initializer(own)
    lin.node.replace_input_with(1, own)
    return qdq.Linear(lin.node, own)


def private(lins: list[qdq.Linear]) -> bool:
    """True when each weight feeds only its own MatMul (a tied embedding table must not be scaled)."""
    return all(len(list(lin.weight.uses())) == 1 for lin in lins)
