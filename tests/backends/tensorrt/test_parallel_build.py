"""Tensor-parallel TensorRT engines built on CPU: one engine per rank, each with its heads, its
KV-cache shape and a distributed-collective (all-reduce) layer after every row-parallel
projection, as the build's own log records; running them needs NVIDIA GPUs with NCCL."""

from __future__ import annotations

import json

import pytest

from compiler.runtime import load
from compiler.runtime.plan import read_plan_header
from tests.backends.tensorrt.test_build import TARGETS, trt_build

pytest.importorskip("tensorrt_rtx")


def test_tp2_rank_engines_hold_collective_layers(tiny_checkpoints, tmp_path):
    art = trt_build(tiny_checkpoints["llama"], tmp_path, "llama-trt-tp2", parallel={"tp": 2},
                    tensorrt={"precision": "float16", "verbose_log": True})
    engine = json.loads((art / "engine.json").read_text())
    p = engine["parallel"]
    assert (p["tp"], p["pp"], [r["model_file"] for r in p["ranks"]]) == (2, 1, ["rank0.engine", "rank1.engine"])
    names = {t["name"]: t for t in engine["inputs"]}
    assert names["past_key.0"]["shape"] == ["batch", 1, 128, 16]  # 2 KV heads / tp 2
    layers = 2
    for r in range(2):
        header = read_plan_header(art / f"rank{r}.engine")
        assert header.targets == TARGETS
        log = (art / f"rank{r}.build.log").read_text()
        collectives = [line for line in log.splitlines() if line.startswith("[VERBOSE] DIST_COLLECTIVE")]
        assert len(collectives) == 2 * layers  # after o_proj and down_proj of each layer
        assert "/layers.1/mlp/down_proj/AllReduce" in collectives[-1]
        assert "Engine generation completed" in log
        assert p["ranks"][r]["steps"] == [{"engine": f"rank{r}.engine", "collectives": 2 * layers}]
    with pytest.raises(ValueError, match="collectives run on NCCL between NVIDIA GPUs"):
        load(art)


def test_tp_with_pipeline_stages_is_refused_for_tensorrt(tiny_checkpoints, tmp_path):
    from compiler.errors import KilnError

    with pytest.raises(KilnError, match="TensorRT multi-rank engines are tensor parallel only so far"):
        trt_build(tiny_checkpoints["llama"], tmp_path, "x", parallel={"tp": 2, "pp": 2})
