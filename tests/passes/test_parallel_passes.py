"""The parallelism passes on real frontend graphs: what tensor_parallel slices and inserts, what
pipeline_stage keeps, and how the ONNX Runtime backend cuts a rank graph at its collectives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compiler.backends.onnxruntime import backend as ort_backend
from compiler.backends.onnxruntime.partition import write_parts
from compiler.frontend import models
from compiler.frontend.checkpoint import Checkpoint
from compiler.passes import PassManager
from compiler.passes.parallel.pipeline import PipelineStage
from compiler.passes.parallel.tensor_parallel import TensorParallel


def _graph(src, passes):
    ckpt = Checkpoint.open(src)
    arch = models.lookup(ckpt.config)
    cfg = arch.config(ckpt.config)
    return PassManager(passes(arch, cfg)).run(arch.build(cfg, ckpt, 64)), cfg, ckpt


def _nodes(model, op):
    return [n for n in model.graph if n.op_type == op]


def test_fused_qkv_is_split_part_by_part(tiny_checkpoints):
    """Phi-3's qkv_proj [H, (4 + 2 + 2) * 16]: rank 1 keeps q heads 2-3, k head 1 and v head 1."""
    model, cfg, ckpt = _graph(tiny_checkpoints["phi3"], lambda a, c: [TensorParallel(a.shards, 2, 1)])
    mm = next(n for n in model.graph if n.name == "/layers.0/attn/qkv_proj/MatMul")
    w = mm.inputs[1].const_value.numpy()
    full = ckpt.read("model.layers.0.self_attn.qkv_proj.weight").T  # [H, 128]
    D = cfg.head_dim
    cols = np.r_[2 * D:4 * D, 4 * D + D:4 * D + 2 * D, 6 * D + D:6 * D + 2 * D]
    np.testing.assert_array_equal(w, full[:, cols])
    split = next(n for n in model.graph if n.name == "/layers.0/attn/qkv_split")
    assert split.inputs[1].const_value.numpy().tolist() == [2 * D, D, D]
    assert {n.attributes["num_heads"].as_int() for n in _nodes(model, "RotaryEmbedding")} == {2, 1}
    assert [v.shape[1] for v in model.graph.inputs if v.name.startswith("past_key.")] == [1] * cfg.num_layers


def test_row_parallel_projections_are_followed_by_an_all_reduce(tiny_checkpoints):
    model, cfg, _ = _graph(tiny_checkpoints["llama"], lambda a, c: [TensorParallel(a.shards, 2, 0)])
    reduces = [n for n in model.graph if n.domain == "kiln"]
    assert [n.name for n in reduces] == [f"/layers.{i}/{p}/AllReduce" for i in range(cfg.num_layers)
                                         for p in ("attn/o_proj", "mlp/down_proj")]
    for n in reduces:
        assert n.inputs[0].producer().op_type == "MatMul"
        assert n.inputs[0].producer().inputs[1].shape[0] in (cfg.num_heads * cfg.head_dim // 2, cfg.intermediate_size // 2)
        assert all(u.op_type == "Add" for u, _ in n.outputs[0].uses())  # the residual add reads the sum


def test_pipeline_stage_keeps_its_layers_and_passes_the_hidden_state(tiny_checkpoints):
    model, cfg, _ = _graph(tiny_checkpoints["llama"], lambda a, c: [PipelineStage(1, ((0, 1), (1, 2)), c.hidden_size)])
    g = model.graph
    assert [v.name for v in g.inputs] == ["position_ids", "past_key.1", "past_value.1", "logits_positions", "hidden_in"]
    assert [v.name for v in g.outputs] == ["logits", "present_key.1", "present_value.1"]
    assert not any(n.name.startswith(("/layers.0/", "/embed/")) for n in g)
    assert "model.layers.0.self_attn.q_proj.weight" not in g.initializers
    first, _, _ = _graph(tiny_checkpoints["llama"], lambda a, c: [PipelineStage(0, ((0, 1), (1, 2)), c.hidden_size)])
    assert [v.name for v in first.graph.outputs] == ["present_key.0", "present_value.0", "hidden_out"]


def test_rank_graph_is_cut_at_collectives_and_parts_share_one_weights_file(tiny_checkpoints, tmp_path):
    model, cfg, _ = _graph(tiny_checkpoints["llama"], lambda a, c: [TensorParallel(a.shards, 2, 0)])
    ort_backend.save(model, tmp_path / "rank0.onnx", "rank0.onnx.data", progress=False)
    steps = write_parts(tmp_path / "rank0.onnx", "rank0")
    assert [("part" if "part" in s else s["collective"]) for s in steps] == ["part", "AllReduce"] * 4 + ["part"]
    for s in steps:
        if "part" not in s:
            assert s["group"] == "tp" and s["reduction"] == "sum"
            continue
        part = onnx.load(str(tmp_path / s["part"]), load_external_data=False)
        assert all(n.domain != "kiln" for n in part.graph.node)
        locations = {e.value for t in part.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations <= {"rank0.onnx.data"}
    assert steps[-1]["outputs"][0] == "logits" or "logits" in steps[-1]["outputs"]
    assert sorted(p.name for p in tmp_path.glob("*.data")) == ["rank0.onnx.data"]


@pytest.mark.parametrize("tp", [3, 4])
def test_shard_sizes_that_do_not_divide_are_refused_by_the_pass(tiny_checkpoints, tp):
    from compiler.errors import KilnError

    with pytest.raises(KilnError, match=f"not divisible by tp={tp}"):
        _graph(tiny_checkpoints["llama"], lambda a, c: [TensorParallel(a.shards, tp, 0)])
