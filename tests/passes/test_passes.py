"""Passes: sibling-MatMul merges (and their refusals), cleanup, the PassManager's IR dumps."""

from __future__ import annotations

from collections import Counter

from compiler import passes
from compiler.frontend import models
from compiler.frontend.checkpoint import Checkpoint
from compiler.passes.fusions.sibling_matmul import SiblingMatMulMerge


def graph_of(src):
    ckpt = Checkpoint.open(src)
    arch = models.lookup(ckpt.config)
    return arch.build(arch.config(ckpt.config), ckpt, 64)


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def test_merges_fuse_projections_and_keep_names_traceable(tiny_checkpoints):
    model = graph_of(tiny_checkpoints["qwen2"])  # qwen2: q/k/v carry biases
    before = ops(model)
    pm = passes.PassManager(passes.make(["merge_qkv", "merge_gate_up", "dce"]))
    model = pm.run(model)
    after = ops(model)
    layers = 2
    assert after["MatMul"] == before["MatMul"] - 3 * layers  # 3 -> 1 for qkv, 2 -> 1 for gate/up, per layer
    assert after["Split"] == 2 * layers
    names = {n.name for n in model.graph}
    assert "/layers.1/attn/qkv_proj/MatMul" in names and "/layers.1/attn/qkv_proj/Add" in names
    assert "/layers.0/mlp/gate_up_proj/MatMul" in names
    merged = model.graph.initializers["layers.0.attn.qkv_proj.weight"]
    assert merged.metadata_props["kiln.merged_from"].split(",") == [
        f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    assert "model.layers.0.self_attn.q_proj.weight" not in model.graph.initializers  # dce dropped the parts
    assert [r.changed for r in pm.records] == [True, True, True]


def test_merge_refuses_and_says_why(tiny_checkpoints):
    model = graph_of(tiny_checkpoints["llama"])
    result = SiblingMatMulMerge("merge_qo", ("q_proj", "o_proj"), "qo_proj").run(model)
    assert not result.changed
    assert any("refused, found only" in note for note in result.notes)


def test_dump_ir_writes_the_graph_after_each_pass(tiny_checkpoints, tmp_path):
    model = graph_of(tiny_checkpoints["llama"])
    passes.PassManager(passes.make(list(passes.DEFAULT_PIPELINE)), dump_dir=tmp_path).run(model)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "00-input.txt" and files[-1] == f"0{len(passes.DEFAULT_PIPELINE)}-shape_inference.txt"
    text = (tmp_path / "01-merge_qkv.txt").read_text()
    assert "/layers.0/attn/qkv_proj/MatMul: MatMul(" in text


def _dedupe_graph():
    """Three equal int64 constants; one with their bytes as another dtype, one with their bytes in
    another shape, one with other values; two equal small lazy (checkpoint) weights."""
    import numpy as np
    import onnx_ir as ir

    reads: list[str] = []

    def value(name, tensor):
        return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape), const_value=tensor)

    def lazy(name):
        return value(name, ir.LazyTensor(lambda: reads.append(name) or ir.tensor(np.ones(64, np.float32)),
                                         dtype=ir.DataType.FLOAT, shape=ir.Shape([64]), name=name))

    axes = np.array([1, 2, 3], np.int64)
    inits = {n: value(n, ir.tensor(a, name=n)) for n, a in [("dup_a", axes), ("dup_b", axes.copy()), ("dup_c", axes.copy()),
                                                            ("same_bytes_f64", axes.view(np.float64)),
                                                            ("same_bytes_1x3", axes.reshape(1, 3)),
                                                            ("other", np.array([4, 5, 6], np.int64))]}
    inits |= {n: lazy(n) for n in ("norm0", "norm1")}
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2, 3]))
    h = ir.Value(name="h", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 64]))
    uses = [("Add", "dup_a"), ("Add", "dup_b"), ("Mul", "dup_c"), ("Add", "other"), ("Add", "same_bytes_1x3")]
    nodes, prev = [], x
    for i, (op, name) in enumerate(uses):
        nodes.append(ir.Node("", op, [prev, inits[name]], name=f"n{i}"))
        prev = nodes[-1].outputs[0]
    nodes.append(ir.Node("", "Identity", [inits["same_bytes_f64"]], name="f64"))
    nodes.append(ir.Node("", "Mul", [h, inits["norm0"]], name="norm0_mul"))
    nodes.append(ir.Node("", "Mul", [nodes[-1].outputs[0], inits["norm1"]], name="norm1_mul"))
    outputs = [prev, nodes[-3].outputs[0], nodes[-1].outputs[0]]
    graph = ir.Graph([x, h], outputs, nodes=nodes, initializers=list(inits.values()), opset_imports={"": 23})
    return ir.Model(graph, ir_version=10), inits, reads


def test_dedupe_constants_merges_exactly_the_duplicates():
    import numpy as np

    model, before, reads = _dedupe_graph()
    node = {n.name: n for n in model.graph}
    pm = passes.PassManager(passes.make(["dedupe_constants"]))
    pm.run(model)
    assert pm.records[0].changed
    g = model.graph
    kept = [n for n in ("dup_a", "dup_b", "dup_c") if n in g.initializers]
    assert len(kept) == 1, f"the three equal constants became {kept}"
    keep = g.initializers[kept[0]]
    assert keep is before[kept[0]]
    assert set(g.initializers) == {kept[0], "same_bytes_f64", "same_bytes_1x3", "other", "norm0", "norm1"}
    assert [node[n].inputs[1] for n in ("n0", "n1", "n2")] == [keep] * 3  # every use rewired to the kept one
    assert np.array_equal(keep.const_value.numpy(), [1, 2, 3]) and keep.const_value.numpy().dtype == np.int64
    for name, user, i in [("other", "n3", 1), ("same_bytes_1x3", "n4", 1), ("same_bytes_f64", "f64", 0),
                          ("norm0", "norm0_mul", 1), ("norm1", "norm1_mul", 1)]:
        assert g.initializers[name] is before[name] and node[user].inputs[i] is before[name], name
    assert g.initializers["same_bytes_f64"].const_value.numpy().view(np.int64).tolist() == [1, 2, 3]
    assert reads == [], "a lazy checkpoint weight was read"
    pm = passes.PassManager(passes.make(["dedupe_constants"]))
    pm.run(model)
    assert not pm.records[0].changed and len(g.initializers) == 6  # nothing left to merge
