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


def test_dedupe_constants_merges_equal_small_constants(tiny_checkpoints):
    model = graph_of(tiny_checkpoints["llama"])
    n = len(model.graph.initializers)
    result = passes.make(["dedupe_constants"])[0].run(model)
    assert result.changed and len(model.graph.initializers) < n
