"""Tensor-parallel TensorRT engines: `rank{r}.engine` per rank, each with its collective layers.

Each rank's graph (tensor_parallel pass: its heads and MLP slice, `kiln::AllReduce` after the
row-parallel projections) is lowered and built on its own, one at a time; the all-reduces
become IDistCollectiveLayers, which run on the NCCL communicator handed to the execution
context. The build log of each rank (`rank{r}.build.log`) records its collective layers.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Callable, Iterator

from compiler.backends.tensorrt import backend as trt_backend
from compiler.runtime.config import ParallelSpec


def emit_ranks(recipe, cfg, rcfg, facts, lay, tmp: Path, progress: bool, models: Iterator, rank_spec: Callable):
    """models: each rank's (graph, PassManager, plugin records) in rank order, built as it is
    taken (one graph in memory at a time); rank_spec: the build side's RankSpec of a rank."""
    rfacts = dataclasses.replace(facts, num_kv_heads=rcfg.num_kv_heads)
    ranks, first, first_pm, nodes, records = [], None, None, 0, []
    for r, (model, pm, records) in enumerate(models):
        first_pm, nodes = first_pm or pm, nodes or len(model.graph)
        collectives = sum(1 for n in model.graph if n.domain == "kiln")
        engine = trt_backend.emit(model, rfacts, rcfg.num_heads, tmp, recipe.tensorrt, max_batch=recipe.max_batch,
                                  max_seq=recipe.max_seq, progress=progress, engine_file=f"rank{r}.engine",
                                  log_file=f"rank{r}.build.log")
        first = first or engine
        del model
        gc.collect()
        ranks.append(rank_spec(lay, r, f"rank{r}.engine", [{"engine": f"rank{r}.engine", "collectives": collectives}], pm))
    engine = dataclasses.replace(first, model_file="rank0.engine",
                                 parallel=ParallelSpec(lay.tp, lay.pp, [list(s) for s in lay.stages], cfg.hidden_size, ranks))
    (tmp / "engine.json").write_text(engine.to_json())
    return engine, f"tensorrt-network {recipe.tensorrt.precision} tp={lay.tp}", first_pm, nodes, records
