"""Node metadata instead of node names: the builder tags every node with its layer and role
(compiler/ir/meta.py), the passes that make nodes carry the tags over, and what calibration's
layer grouping, pipeline_stage and tensor_parallel do does not depend on what nodes are called."""

from __future__ import annotations

import re

import pytest

from compiler.frontend import models
from compiler.frontend.checkpoint import Checkpoint
from compiler.ir import meta
from compiler.passes import PassManager, make
from compiler.passes.parallel.pipeline import PipelineStage
from compiler.passes.parallel.tensor_parallel import TensorParallel
from compiler.passes.quant import calibration

_IN_LAYER = re.compile(r"^/layers\.(\d+)/")  # the test reads names only to check the tags agree with them


def _build(src, max_seq: int = 64):
    ckpt = Checkpoint.open(src)
    arch = models.lookup(ckpt.config)
    cfg = arch.config(ckpt.config)
    return arch, cfg, arch.build(cfg, ckpt, max_seq)


def _assert_layers_tagged(model) -> None:
    for n in model.graph:
        m = _IN_LAYER.match(n.name)
        assert meta.layer_of(n) == (int(m.group(1)) if m else None), n.name


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen3_moe"])
def test_every_node_in_a_layer_carries_its_layer_index(tiny_checkpoints, arch):
    _, cfg, model = _build(tiny_checkpoints[arch])
    _assert_layers_tagged(model)
    assert {meta.layer_of(n) for n in model.graph} == {None, *range(cfg.num_layers)}


def test_bert_layers_are_tagged(tmp_path):
    from tests.tiny_models import make_bert

    _, _, model = _build(make_bert(tmp_path / "bert"), 32)
    _assert_layers_tagged(model)
    assert {meta.role_of(n) for n in model.graph if n.op_type == "Attention"} == {"attn"}


def test_roles_name_the_projection_and_the_parts_outside_the_layers(tiny_checkpoints):
    _, _, model = _build(tiny_checkpoints["llama"])
    roles = {n.name: meta.role_of(n) for n in model.graph}
    assert roles["/layers.1/attn/q_proj/MatMul"] == "attn.q_proj"
    assert roles["/layers.1/mlp/down_proj/MatMul"] == "mlp.down_proj"
    assert roles["/layers.1/attn_norm/RMSNormalization"] == "attn_norm"
    assert roles["/layers.1/attn_residual"] is None  # built directly in the layer's scope
    assert roles["/lm_head/MatMul"] == "lm_head"
    assert roles["/norm/RMSNormalization"] == "norm"
    assert {r for name, r in roles.items() if name.startswith("/inputs/")} == {meta.INPUTS}
    assert {r for name, r in roles.items() if name.startswith("/embed/")} == {"embed"}


def test_tags_survive_serialisation(tiny_checkpoints):
    import onnx_ir as ir

    _, _, model = _build(tiny_checkpoints["llama"])
    back = ir.serde.deserialize_model(ir.to_proto(model))
    assert [(meta.layer_of(n), meta.role_of(n)) for n in back.graph] == [(meta.layer_of(n), meta.role_of(n)) for n in model.graph]


def test_merged_and_quantised_nodes_carry_the_tags(tiny_checkpoints):
    from compiler.passes.quant import quantizer
    from compiler.passes.quant.int8_wo import Int8WoConfig

    _, _, model = _build(tiny_checkpoints["qwen2"])  # q/k/v biases: the merged Add too
    model = PassManager([*make(["merge_qkv", "merge_gate_up"]), quantizer(Int8WoConfig(scheme="int8-wo"))]).run(model)
    _assert_layers_tagged(model)
    roles = {n.name: meta.role_of(n) for n in model.graph}
    for leaf in ("MatMul", "Add", "Split"):
        assert roles[f"/layers.0/attn/qkv_proj/{leaf}"] == "attn.qkv_proj"
    assert roles["/layers.0/mlp/gate_up_proj/weight_dq"] == "mlp.gate_up_proj"


def _renamed(model) -> dict:
    """Rename every node n0, n1, ...; returns node -> its name before."""
    before = {}
    for k, n in enumerate(model.graph):
        before[n] = n.name
        n.name = f"n{k}"
    return before


def _kept(model, before: dict) -> list[tuple[str, str]]:
    """The nodes after a pass, by their name before renaming (new nodes: op and layer)."""
    return sorted((before[n] if n in before else f"new:{meta.layer_of(n)}", n.op_type) for n in model.graph)


def _run_both(src, passes):
    """Run passes on a graph as built and on one whose nodes were renamed first."""
    _, cfg, plain = _build(src)
    plain = PassManager(passes(cfg)).run(plain)
    _, cfg, renamed = _build(src)
    before = _renamed(renamed)
    renamed = PassManager(passes(cfg)).run(renamed)
    return plain, renamed, before


@pytest.mark.parametrize("stage", [0, 1])
def test_pipeline_split_does_not_depend_on_node_names(tiny_checkpoints, stage):
    plain, renamed, before = _run_both(tiny_checkpoints["llama"], lambda c: [PipelineStage(stage, ((0, 1), (1, 2)), c.hidden_size)])
    assert _kept(renamed, before) == _kept(plain, {n: n.name for n in plain.graph})
    assert [v.name for v in renamed.graph.inputs] == [v.name for v in plain.graph.inputs]
    assert [v.name for v in renamed.graph.outputs] == [v.name for v in plain.graph.outputs]


@pytest.mark.parametrize("arch,merge", [("llama", False), ("phi3", False), ("qwen2", True)])
def test_tensor_parallel_selection_does_not_depend_on_node_names(tiny_checkpoints, arch, merge):
    shards = models.lookup(Checkpoint.open(tiny_checkpoints[arch]).config).shards

    def passes(c):
        return [*(make(["merge_qkv", "merge_gate_up"]) if merge else []), TensorParallel(shards, 2, 1)]

    plain, renamed, before = _run_both(tiny_checkpoints[arch], passes)

    def weights(model):  # merged weights are named after their nodes: compare shapes per layer instead
        return sorted((str(v.shape), v.dtype) for v in model.graph.initializers.values())

    assert weights(renamed) == weights(plain)
    heads = {before.get(n, n.name): n.attributes["num_heads"].as_int() for n in renamed.graph if "num_heads" in n.attributes}
    assert heads == {n.name: n.attributes["num_heads"].as_int() for n in plain.graph if "num_heads" in n.attributes}
    reduces = [(before[n.inputs[0].producer()], meta.layer_of(n)) for n in renamed.graph if n.op_type == "AllReduce"]
    assert reduces == [(n.inputs[0].producer().name, meta.layer_of(n)) for n in plain.graph if n.op_type == "AllReduce"]
    assert len(reduces) == 2 * 2 and all(layer is not None for _, layer in reduces)


def test_calibration_layer_grouping_does_not_depend_on_node_names(tiny_checkpoints):
    _, _, plain = _build(tiny_checkpoints["llama"])
    _, _, renamed = _build(tiny_checkpoints["llama"])
    before = _renamed(renamed)

    def parts(model, name_of):
        targets = calibration._default_targets(model.graph)
        return [(p.name, sorted(name_of(n) for n in p.nodes), sorted(name_of_target(model, t, name_of) for t in p.targets))
                for p in calibration._partition(model.graph, targets)]

    def name_of_target(model, t, name_of):
        return name_of(next(n for n in model.graph if n.name == t))

    want = parts(plain, lambda n: n.name)
    assert [p[0] for p in want] == ["prologue", "layers.0", "layers.1", "epilogue"]
    assert parts(renamed, lambda n: before[n]) == want
