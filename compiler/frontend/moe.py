"""Top-k routed mixture-of-experts MLP (Mixtral, Qwen3-MoE) in standard ONNX ops.

Routing is explicit in the graph, so a backend with a native MoE kernel can match it:
  probs = Softmax(x @ W_router)                  [T, E]   (T = B*S tokens)
  top, idx = TopK(probs, k)                      [T, k]   (renormalised when the model does)
  route = ReduceSum(OneHot(idx, E) * top, k)     [T, E]   (zero outside each token's top k)
The experts run in their dense form: all E at once as batched MatMuls on stacked weights
[E, H, I] / [E, I, H], weighted by `route` and summed over E. Exact, and E/k times the work of
a sparse kernel: fine for CPU parity and small models; native kernels are a backend's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from compiler.frontend import layers as L
from compiler.frontend.weights import Weights
from compiler.ir.builder import GraphBuilder


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    expert_size: int  # intermediate size of one expert
    normalize: bool  # renormalise the top-k probabilities to sum to 1
    router: str  # checkpoint name of the router weight [E, H], `{i}` = layer
    expert: str  # checkpoint name of one expert projection, `{i}` layer, `{e}` expert, `{p}` projection
    projections: tuple[str, str, str]  # the names of gate, up and down in `expert`
    dense_layers: frozenset[int] = frozenset()  # layers that keep a dense MLP (Qwen3-MoE)


def moe_mlp(b: GraphBuilder, w: Weights, m: MoeConfig, i: int, h: ir.Value, hidden: int, act: str) -> ir.Value:
    """h [B, S, H] -> [B, S, H]."""
    E, I = m.num_experts, m.expert_size
    x = b.op("Reshape", [h, b.const(np.array([-1, hidden]), "tokens_shape")], "tokens")  # [T, H]
    with b.scope("router"):
        route = _route(b, w, m, i, x, hidden)  # [T, E]
    with b.scope("experts"):
        names = [[m.expert.format(i=i, e=e, p=p) for e in range(E)] for p in m.projections]
        gate_w = w.stack(names[0], (I, hidden), f"layers.{i}.experts.gate_proj.weight", transpose=True)  # [E, H, I]
        up_w = w.stack(names[1], (I, hidden), f"layers.{i}.experts.up_proj.weight", transpose=True)
        down_w = w.stack(names[2], (hidden, I), f"layers.{i}.experts.down_proj.weight", transpose=True)  # [E, I, H]
        gate = b.op("MatMul", [x, gate_w], "gate_proj")  # [E, T, I]
        up = b.op("MatMul", [x, up_w], "up_proj")
        y = b.op("MatMul", [L.gated_mlp(b, gate, up, act), down_w], "down_proj")  # [E, T, H]
        weight = b.op("Unsqueeze", [b.op("Transpose", [route], "route_by_expert", perm=[1, 0]),
                                    b.const(np.array([-1]), "last_axis")], "route_weight")  # [E, T, 1]
        y = b.op("ReduceSum", [b.op("Mul", [y, weight], "weighted"), b.const(np.array([0]), "expert_axis")], "combine",
                 keepdims=0)  # [T, H]
    return b.op("Reshape", [y, b.op("Shape", [h], "input_shape")], "restore")  # [B, S, H]


def _route(b: GraphBuilder, w: Weights, m: MoeConfig, i: int, x: ir.Value, hidden: int) -> ir.Value:
    """Routing weights [T, E]: softmax probabilities of each token's top k experts, 0 elsewhere."""
    router = w.get(m.router.format(i=i), (m.num_experts, hidden), transpose=True)  # [H, E]
    probs = b.op("Softmax", [b.op("MatMul", [x, router], "MatMul")], "Softmax", axis=-1)
    top, idx = b.op("TopK", [probs, b.const(np.array([m.top_k]), "k")], "TopK", num_outputs=2, axis=-1)  # [T, k]
    if m.normalize:
        top = b.op("Div", [top, b.op("ReduceSum", [top, b.const(np.array([-1]), "last_axis")], "top_sum", keepdims=1)],
                   "renormalise")
    onehot = b.op("OneHot", [idx, b.const(np.array(m.num_experts), "depth"), b.const(np.array([0.0, 1.0], np.float32), "values")],
                  "OneHot", axis=-1)  # [T, k, E]
    scaled = b.op("Mul", [onehot, b.op("Unsqueeze", [top, b.const(np.array([-1]), "last_axis_1")], "top_weight")], "scatter")
    return b.op("ReduceSum", [scaled, b.const(np.array([1]), "k_axis")], "route", keepdims=0)  # [T, E]
