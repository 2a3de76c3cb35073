"""Multi-rank builds (`parallel: {tp, pp}` in a recipe): one graph per rank, written one at a time.

For rank r = stage * tp + tp_rank the frontend's graph goes through the build pipeline with the
rank's split in front: `pipeline_stage` (its layers only, hidden state in/out) and
`tensor_parallel` (the architecture's ShardSpecs: weights split, all-reduces inserted), then the
recipe's passes; the backend's rank loop (compiler/backends/base.py) writes each. Weights stay
lazy until a rank is written, and each rank's graph is dropped before the next is built, so the
build's peak memory does not grow with the number of ranks.
  onnxruntime  rank{r}.onnx (+ .data): the rank's graph with its collectives, and
               rank{r}.part{k}.onnx: the pieces between collectives, sharing that weights file.
  tensorrt     rank{r}.engine with native collective layers (tp only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compiler.build import pipeline
from compiler.backends.base import RankOutput
from compiler.errors import KilnError
from compiler.frontend.sharding import Layout, plan
from compiler.ir.builder import initializer_bytes
from compiler.passes import PassManager
from compiler.passes.parallel.pipeline import PipelineStage
from compiler.passes.parallel.tensor_parallel import TensorParallel
from compiler.runtime.config import EngineConfig, ParallelSpec, RankSpec


def layout(recipe, arch, cfg) -> Layout:
    """The recipe's tp x pp layout, checked against the model and the rest of the recipe."""
    p = recipe.parallel
    if recipe.quantization is not None:
        raise KilnError("quantization with parallel.tp/pp > 1 is not supported yet",
                        "build the quantised engine single-rank, or remove quantization")
    if arch.task != "generate":
        raise KilnError(f"{arch.name} is an encoder: kiln splits decoders only", "remove parallel from the recipe")
    if recipe.backend == "onnxruntime" and recipe.onnxruntime.device != "cpu":
        raise KilnError("multi-rank ONNX Runtime engines run on the CPU provider (gloo) so far",
                        "set onnxruntime.device: cpu, or build a single-rank CUDA engine")
    if recipe.backend == "tensorrt" and p.pp > 1:
        raise KilnError("TensorRT multi-rank engines are tensor parallel only so far", "set parallel.pp: 1")
    stages = [tuple(s) for s in p.stages] if p.stages else None
    return plan(cfg, p.tp, p.pp, stages, arch.name, arch.shardable)


def rank_models(recipe, arch, cfg, ckpt, lay: Layout, ctx: pipeline.Context, dump_ir: Path | None, managers: list):
    """Each rank's graph after its pipeline (parallel split, then the recipe's passes), built as
    it is taken; each rank's PassManager is appended to `managers`."""
    for rank in range(lay.world_size):
        pm = PassManager(rank_plan(recipe, arch, cfg, lay, ctx, rank), dump_dir=dump_ir / f"rank{rank}" if dump_ir else None)
        managers.append(pm)
        yield pm.run(arch.build(cfg, ckpt, recipe.max_seq))


def rank_plan(recipe, arch, cfg, lay: Layout, ctx: pipeline.Context, rank: int) -> list:
    """The rank's pipeline: its split (pipeline_stage, tensor_parallel), then the build's passes
    with the model config as the rank sees it."""
    stage, tp_rank = lay.coords(rank)
    split = [PipelineStage(stage, lay.stages, cfg.hidden_size), TensorParallel(arch.shards, lay.tp, tp_rank)]
    return pipeline.plan(recipe, dataclasses.replace(ctx, cfg=rank_config(cfg, lay)), split)


def rank_spec(lay: Layout, rank: int, out: RankOutput, pm: PassManager) -> RankSpec:
    stage, tp_rank = lay.coords(rank)
    tp_pass = next(p for p in pm.passes if isinstance(p, TensorParallel))
    return RankSpec(rank, stage, tp_rank, list(lay.stages[stage]), out.model_file, out.steps,
                    tp_pass.sharded_bytes + tp_pass.replicated_bytes, tp_pass.replicated_bytes)


def parallel_spec(lay: Layout, cfg, ranks: list[RankSpec]) -> ParallelSpec:
    return ParallelSpec(lay.tp, lay.pp, [list(s) for s in lay.stages], cfg.hidden_size, ranks)


def rank_config(cfg, lay: Layout):
    """The model config as one rank sees it (its heads and intermediate slice)."""
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // lay.tp, num_kv_heads=cfg.num_kv_heads // lay.tp,
                               intermediate_size=cfg.intermediate_size // lay.tp)


def manifest_section(engine: EngineConfig, arch, cfg, ckpt, max_seq: int) -> dict:
    """kiln.json's `parallel`: the layout, each rank's place and weight bytes, and what is
    replicated beyond total / world_size (embeddings, norms, lm_head, routed experts)."""
    p = engine.parallel
    total = initializer_bytes(arch.build(cfg, ckpt, max_seq).graph)  # lazy: no weight is read
    return {
        "world_size": p.world_size, "tp": p.tp, "pp": p.pp, "stages": p.stages,
        "weight_bytes_single_rank": total,
        "ranks": [{"rank": r.rank, "stage": r.stage, "tp_rank": r.tp_rank, "layers": r.layers, "weight_bytes": r.weight_bytes,
                   "replicated_bytes": r.replicated_bytes,
                   "files": sorted({r.model_file, *(s["part"] for s in r.steps if "part" in s)})} for r in p.ranks],
    }
