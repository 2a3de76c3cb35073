"""Where a node sits in the model, as node metadata: the one API passes read it through.

Node names (`/layers.3/attn/q_proj/MatMul`) are for people reading a graph; no pass parses
them. The frontend's builder writes two `metadata_props` on every node it makes:

  kiln.layer  the decoder/encoder layer index, "3"; absent outside the layers
  kiln.role   the node's scope path below its layer (or from the root outside the layers),
              dot-joined: "attn.q_proj", "mlp.down_proj", "mlp.experts.gate_proj",
              "attn_norm", "inputs", "embed", "norm", "select", "lm_head"; absent for a node
              built directly in a layer's scope (the residual Adds)

A pass that replaces or inserts nodes copies them with `copy_meta` (a merged projection is
tagged with its new role), so layer grouping, pipeline stages and shard selection keep working
whatever the nodes are called.
"""

from __future__ import annotations

import onnx_ir as ir

LAYER = "kiln.layer"
ROLE = "kiln.role"

INPUTS = "inputs"  # positions, masks, rope tables: derived from graph inputs, read by every layer


def layer_of(node: ir.Node) -> int | None:
    """The layer index of node, or None outside the layers."""
    value = node.metadata_props.get(LAYER)
    return None if value is None else int(value)


def role_of(node: ir.Node) -> str | None:
    """The node's role, e.g. "attn.q_proj", or None when it has none."""
    return node.metadata_props.get(ROLE)


def tag(node: ir.Node, layer: int | None, role: str | None) -> None:
    """Set (or, with None, clear) node's layer and role."""
    for key, value in ((LAYER, None if layer is None else str(layer)), (ROLE, role)):
        if value is None:
            node.metadata_props.pop(key, None)
        else:
            node.metadata_props[key] = value


def copy_meta(source: ir.Node, *targets: ir.Node, role: str | None = None) -> None:
    """Give targets source's layer and role (role: a different role, e.g. of a merged projection)."""
    for t in targets:
        tag(t, layer_of(source), role if role is not None else role_of(source))


def split_role(role: str | None) -> tuple[str, str]:
    """("attn", "q_proj") for "attn.q_proj": the enclosing scope and the leaf ("" when absent)."""
    parent, _, leaf = (role or "").rpartition(".")
    return parent, leaf
