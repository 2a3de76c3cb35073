"""gguf: every linear keeps the grid its GGUF file stored, exactly (no re-quantisation).

For a `.gguf` source the frontend builds the graph from the dequantised checkpoint the importer
wrote; this pass then swaps each MatMul weight for its file's own integers and scales:
  4-bit types (Q4_0, Q4_1, Q4_K)            DequantizeLinear(uint4, block 32) -> MatMul
  5/6/8-bit types (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0)  DequantizeLinear(uint8, block 16 or 32) -> MatMul
(ONNX Runtime fuses both into MatMulNBits.) TensorRT's int4 is signed with no zero point and its
int8 has no block scales, so for it every 4-bit grid becomes int4 q - 8 with the block constant
d (8 - zp) + m as the correction below (none for Q4_0), and a build whose linears hold 8-bit
grids is refused, each tensor named. A type's fixed offset (8 for Q4_0, 32 for Q6_K, 128
for Q8_0) is the integer zero point. A block minimum (Q4_1, Q5_1, Q4_K, Q5_K: w = d q + m) has
no integer zero point, and MatMulNBits' float zero points are 25-50x slower, so the minimum
becomes a correction beside the product (ReduceSum is over each block of 32 inputs):
    y = x @ (d q) + ReduceSum(x [.., K/32, 32]) @ m [K/32, N]
With fp32 activations (int4_accuracy_level 0, the default) 8-bit grids stay as their exact fp32
values (see DENSE_8BIT). Each grid is checked against the dequantised weight before it is used (rows in the file's order
or un-permuted for rotary as llama.cpp stores q/k); a tensor whose type kiln does not map, or a
merged linear whose parts have different grids, stays dequantised and is named in the pass note.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from compiler.frontend.gguf_grids import GgufTensors, Grid
from compiler.ir import meta
from compiler.passes.base import PassResult
from compiler.passes.quant import qdq
from compiler.passes.quant.base import SchemeConfig, WeightQuantizer, with_precision


# ONNX Runtime 1.31's CPU MatMulNBits has no fp32-activation kernel for 8 bits: it dequantises the
# whole weight each call (576x1536: 650 us against 19 us at level 4 and ~40 us for 4 bits at level 0).
# The dequantised weight is the grid's exact value, so with fp32 activations it stays fp32.
DENSE_8BIT = "kept as its exact fp32 values (MatMulNBits has no fp32-activation 8-bit kernel; level 4 uses its grid)"


class GgufConfig(SchemeConfig):
    scheme: Literal["gguf"]
    file: str | None = None  # the .gguf whose grids to keep; default: the recipe's source


@dataclass
class GgufSource:
    """The GGUF file and the dequantised checkpoint built from it (the reference of every grid)."""

    path: Path
    ckpt: object  # compiler.frontend.checkpoint.Checkpoint
    heads: tuple[int, ...]  # head counts whose rotary row permutation llama.cpp may have applied
    _tensors: GgufTensors | None = field(default=None, repr=False)
    _orders: dict = field(default_factory=dict, repr=False)  # checkpoint name -> row order that matched

    @property
    def tensors(self) -> GgufTensors:
        if self._tensors is None:
            try:
                self._tensors = GgufTensors(self.path)
            except (ValueError, OSError, IndexError, KeyError) as e:  # the gguf reader's refusals
                raise KilnError(f"{self.path} is not a readable GGUF file ({e})",
                                "point quantization.file (or source) at a llama.cpp .gguf model file") from None
        return self._tensors

    @functools.cached_property
    def _names(self):
        """The gguf package's map from checkpoint names to this architecture's GGUF names (built once)."""
        import gguf

        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(self.tensors.arch)
        if arch is None:
            raise KilnError(f"{self.path}: GGUF architecture {self.tensors.arch!r} is unknown to the gguf package",
                            "use a GGUF of a supported architecture or build from the dequantised checkpoint")
        return gguf.get_tensor_name_map(arch, int(self.ckpt.config.get("num_hidden_layers", 0)))

    def gguf_name(self, hf_name: str) -> str | None:
        name = self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        return name if name in self.tensors.tensors else None

    def grid(self, hf_name: str) -> tuple[Grid | None, str]:
        """The grid of checkpoint tensor `hf_name` in checkpoint row order, or (None, why). The
        first call checks it against the checkpoint and remembers the row order that matched."""
        name = self.gguf_name(hf_name)
        if name is None:
            return None, "no GGUF tensor"
        grid = self.tensors.grid(name)
        if grid is None:
            return None, self.tensors.kind(name)
        if hf_name in self._orders:
            order = self._orders[hf_name]
            return (grid if order is None else grid.take_rows(order)), grid.kind
        dense = np.asarray(self.ckpt.read(hf_name), dtype=np.float32)
        for order in _row_orders(grid.q.shape[0], self.heads):
            cand = grid if order is None else grid.take_rows(order)
            values = cand.dequantize()
            if values.shape == dense.shape and np.array_equal(values, dense):
                self._orders[hf_name] = order
                return cand, grid.kind
        raise KilnError(f"{self.path}: the {grid.kind} grid of {name} does not reproduce {hf_name} of the imported checkpoint",
                        "re-import the GGUF (delete kiln's cache entry for it) or report the file's type")


def open_source(recipe, cfg, ckpt) -> GgufSource:
    """The GGUF file whose grids the gguf scheme keeps (`file`, else the recipe's .gguf source),
    opened now: a path that is not a GGUF file is refused before any work."""
    file = recipe.quantization.file or recipe.source
    path = Path(file).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise KilnError(f"quantization scheme gguf needs a .gguf file; {file} is not one",
                        "set source: to the .gguf file (or quantization.file: to the one the checkpoint came from)")
    source = GgufSource(path, ckpt, (getattr(cfg, "num_heads", 0), getattr(cfg, "num_kv_heads", 0)))
    _ = source.tensors
    return source


def _row_orders(rows: int, heads: tuple[int, ...]):
    """Identity, then llama.cpp's rotary permutation undone for each head count that divides rows
    (its converter stores hf rows P = [h, 2, d/2] -> [h, d/2, 2] of each q/k weight)."""
    yield None
    for h in heads:
        if h and rows % (2 * h) == 0:
            stored = np.arange(rows).reshape(h, 2, rows // h // 2).swapaxes(1, 2).reshape(-1)  # file row j = hf row stored[j]
            yield np.argsort(stored)


def _same_form(grids: list[Grid]) -> bool:
    g0 = grids[0]
    return all(g.block == g0.block and g.bits == g0.bits and g.zero_point == g0.zero_point
               and (g.offset is None) == (g0.offset is None) for g in grids)


class GgufGrids(WeightQuantizer):
    name = "quantize_gguf"

    def __init__(self, cfg: GgufConfig, source: GgufSource, int8_activations: bool = False, signed_int4: bool = False):
        super().__init__(cfg)
        self.source, self.int8_activations, self.signed_int4 = source, int8_activations, signed_int4
        self.kinds: dict[str, int] = {}
        self.dequantised: dict[str, str] = {}  # linear -> why

    def quantize_linear(self, graph: ir.Graph, lin: qdq.Linear) -> None:
        names = lin.weight.metadata_props.get("kiln.merged_from", lin.weight.name).split(",")
        found = [self.source.grid(n) for n in names]
        grids = [g for g, _ in found]
        if any(g is None for g in grids) or not _same_form(grids):
            why = ", ".join(f"{n}: {k}" for n, (g, k) in zip(names, found)) if any(g is None for g in grids) else \
                "its parts have different grids: " + ", ".join(g.kind for g in grids)
            self.dequantised[lin.node.name] = why
            return
        if grids[0].bits == 8 and not self.int8_activations:
            self.dequantised[lin.node.name] = f"{grids[0].kind}: {DENSE_8BIT}"
            return
        for g in grids:
            self.kinds[g.kind] = self.kinds.get(g.kind, 0) + 1
        form = grids[0]
        del grids, found  # decoded again, one linear at a time, when the model is saved
        use_grid(graph, lin, lambda: _concat([self.source.grid(n)[0] for n in names]), form, self.signed_int4)

    def _check_signed_int4(self, graph: ir.Graph) -> None:
        """Before anything changes: every quantised linear's parts must have 4-bit grids (TensorRT's
        signed int4 blocks); the others are named with what TensorRT lacks for them."""
        bad = {}
        for lin, precision in with_precision(self.cfg, qdq.linears(graph)):
            if precision is not None:  # overrides: not a grid
                continue
            for name in lin.weight.metadata_props.get("kiln.merged_from", lin.weight.name).split(","):
                grid, kind = self.source.grid(name)
                why = _tensorrt_lacks(grid, kind)
                if why:
                    bad[self.source.gguf_name(name) or name] = why
        if bad:
            listed = "; ".join(f"{n} ({why})" for n, why in sorted(bad.items())[:6])
            more = f"; and {len(bad) - 6} more" if len(bad) > 6 else ""
            raise KilnError(f"TensorRT backend: {len(bad)} GGUF tensors have grids TensorRT cannot hold exactly: {listed}{more}",
                            "use backend: onnxruntime, or keep those linears at their dequantised values with "
                            "quantization.overrides: [{match: '/lm_head/*', precision: fp32}] (one match per linear)")

    def run(self, model: ir.Model) -> PassResult:
        if self.signed_int4:
            self._check_signed_int4(model.graph)
        res = super().run(model)
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))
        notes = [f"GGUF grids kept: {kinds or 'none'}; {len(self.dequantised)} linears dequantised"]
        notes += [f"dequantised {name} ({why})" for name, why in self.dequantised.items()]
        return PassResult(res.model, bool(self.kinds), notes)


def _tensorrt_lacks(grid: Grid | None, kind: str) -> str | None:
    """Why TensorRT cannot hold this grid exactly, or None (4-bit: signed int4 blocks and a correction)."""
    if grid is None:
        return f"{kind}: no grid kiln maps"
    if grid.bits != 4:
        return f"{kind}: {grid.bits}-bit blocks; TensorRT block scales are int4 only"
    return None


def _concat(grids: list[Grid]) -> Grid:
    """Merged projections: the parts' rows (output features) one after another."""
    if len(grids) == 1:
        return grids[0]
    g0 = grids[0]
    off = None if g0.offset is None else np.concatenate([g.offset for g in grids])
    return Grid(np.concatenate([g.q for g in grids]), np.concatenate([g.scale for g in grids]), g0.zero_point, off,
                g0.block, g0.bits, "+".join(g.kind for g in grids))


def use_grid(graph: ir.Graph, lin: qdq.Linear, make, form: Grid, signed: bool = False) -> None:
    """DequantizeLinear(q [K, N], scale [K/b, N], zp, axis 0, block b) -> MatMul, and for a grid
    with block minimums the correction ReduceSum(x per block) @ offset [K/b, N] added after it.
    make() -> the Grid (of lin's whole weight), called when the model is saved; form: a grid of
    the same type (bits, block, zero point, whether it has minimums). signed: a 4-bit grid as
    4-bit grid as int4 q - 8 with no zero point input and d (8 - zp) moved into the correction
    (TensorRT's form; the same values)."""
    K, N = (int(d) for d in lin.weight.shape)
    G = K // form.block
    if signed:
        qtype, npq = ir.DataType.INT4, ml_dtypes.int4
        specs = {"q": (qtype, (K, N)), "scale": (ir.DataType.FLOAT, (G, N))}
    else:
        qtype = ir.DataType.UINT4 if form.bits == 4 else ir.DataType.UINT8
        npq = ml_dtypes.uint4 if form.bits == 4 else np.uint8
        specs = {"q": (qtype, (K, N)), "scale": (ir.DataType.FLOAT, (G, N)), "zp": (qtype, (G, N))}
    corrected = form.offset is not None or (signed and form.zero_point != 8)
    if corrected:
        specs["offset"] = (ir.DataType.FLOAT, (G, N))

    def arrays() -> dict[str, np.ndarray]:
        g = make()
        zp = 8 if signed else g.zero_point
        out = {"q": np.ascontiguousarray(g.q.T.astype(np.int16) - (zp if signed else 0)).astype(npq),  # [K, N]
               "scale": np.ascontiguousarray(g.scale.T)}  # [K/b, N]
        if not signed:
            out["zp"] = np.full((G, N), zp, dtype=np.uint8).astype(npq)
        if corrected:  # w = d (q - zp) + m = d (q - zp') + [d (zp' - zp) + m]
            off = g.scale * np.float32(zp - g.zero_point) + (0 if g.offset is None else g.offset)
            out["offset"] = np.ascontiguousarray(off.T, dtype=np.float32)
        return out

    inputs = qdq.lazy_inputs(graph, lin, arrays, specs)
    weight = inputs[:2] if signed else inputs[:3]
    qdq.dequantize_weight(graph, lin, weight, [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", form.block)])
    if corrected:
        _add_offset(graph, lin, inputs[-1], form.block, G)


def _add_offset(graph: ir.Graph, lin: qdq.Linear, off: ir.Value, block: int, blocks: int) -> None:
    """off: the [K/b, N] minimums' initializer."""
    base = lin.prefix("weight")
    x, y = lin.node.inputs[0], lin.node.outputs[0]
    shape = qdq.initializer(graph, f"{base}_block_shape", np.array([0, 0, blocks, block], dtype=np.int64))
    axes = qdq.initializer(graph, f"{base}_block_axis", np.array([-1], dtype=np.int64))
    s = lin.scope
    blocked = ir.Node("", "Reshape", [x, shape], name=f"{s}/offset_blocks")  # [B, S, K/b, b]
    sums = ir.Node("", "ReduceSum", [blocked.outputs[0], axes], attributes=[ir.AttrInt64("keepdims", 0)],
                   name=f"{s}/offset_block_sums")  # [B, S, K/b]
    product = ir.Node("", "MatMul", [sums.outputs[0], off], name=f"{s}/offset_MatMul")  # [B, S, N]
    add = ir.Node("", "Add", [y, product.outputs[0]], name=f"{s}/offset_Add")
    nodes = [blocked, sums, product, add]
    for n in nodes:
        n.outputs[0].name = f"{n.name}_output_0"
        n.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    add.outputs[0].shape = y.shape
    meta.copy_meta(lin.node, *nodes)
    graph.insert_after(lin.node, nodes)
    out = add.outputs[0]
    is_output = y in graph.outputs
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    add.replace_input_with(0, y)
    if is_output:  # the graph's output keeps its name
        out.name, y.name = y.name, f"{y.name}_before_offset"
