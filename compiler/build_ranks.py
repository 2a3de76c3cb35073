"""Multi-rank builds (`parallel: {tp, pp}` in a recipe): one graph per rank, written one at a time.

For rank r = stage * tp + tp_rank the frontend's graph goes through `tensor_parallel` (the
architecture's ShardSpecs: weights split, all-reduces inserted) and `pipeline_stage` (its
layers only, hidden state in/out), then the recipe's passes and the backend. Weights stay lazy
until a rank is written, and each rank's graph is dropped before the next is built, so the
build's peak memory does not grow with the number of ranks.
  onnxruntime  rank{r}.onnx (+ .data): the rank's graph with its collectives, and
               rank{r}.part{k}.onnx: the pieces between collectives, sharing that weights file.
  tensorrt     rank{r}.engine with native collective layers (tp only).
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

from compiler.backends.onnxruntime import backend as ort_backend
from compiler.backends.onnxruntime.legalise import legalise
from compiler.backends.onnxruntime.partition import write_parts
from compiler.errors import KilnError
from compiler.frontend.sharding import Layout, plan
from compiler.ir.builder import initializer_bytes
from compiler.passes import PassManager, make, plugin_ops
from compiler.passes.parallel.pipeline import PipelineStage
from compiler.passes.parallel.tensor_parallel import TensorParallel
from compiler.runtime.config import EngineConfig, KVCacheSpec, ParallelSpec, RankSpec, SessionConfig, TensorSpec


def layout(recipe, arch, cfg) -> Layout:
    """The recipe's tp x pp layout, checked against the model and the rest of the recipe."""
    p = recipe.parallel
    if recipe.quantization is not None:
        raise KilnError("quantization with parallel.tp/pp > 1 is not supported yet",
                        "build the quantised engine single-rank, or remove quantization")
    if getattr(arch, "TASK", "generate") != "generate":
        raise KilnError(f"{arch.ARCH} is an encoder: kiln splits decoders only", "remove parallel from the recipe")
    if recipe.backend == "onnxruntime" and recipe.onnxruntime.device != "cpu":
        raise KilnError("multi-rank ONNX Runtime engines run on the CPU provider (gloo) so far",
                        "set onnxruntime.device: cpu, or build a single-rank CUDA engine")
    if recipe.backend == "tensorrt" and p.pp > 1:
        raise KilnError("TensorRT multi-rank engines are tensor parallel only so far", "set parallel.pp: 1")
    stages = [tuple(s) for s in p.stages] if p.stages else None
    return plan(cfg, p.tp, p.pp, stages, arch.ARCH, getattr(arch, "SHARDS", None) is not None)


def rank_model(recipe, arch, cfg, ckpt, lay: Layout, rank: int, dump_ir: Path | None):
    """The rank's graph after the parallel passes, the recipe's passes and the plugin binding; the
    PassManager; the plugin records (the same for every rank)."""
    stage, tp_rank = lay.coords(rank)
    model = arch.build(cfg, ckpt, recipe.max_seq)
    passes = [PipelineStage(stage, lay.stages, cfg.hidden_size), TensorParallel(getattr(arch, "SHARDS", ()), lay.tp, tp_rank)]
    pm = PassManager(passes + make(recipe.passes) + plugin_ops.rewrite_passes(recipe),
                     dump_dir=dump_ir / f"rank{rank}" if dump_ir else None)
    model, records = plugin_ops.bind(pm.run(model), recipe.backend)
    return model, pm, records


def rank_spec(lay: Layout, rank: int, model_file: str, steps: list[dict], pm: PassManager) -> RankSpec:
    stage, tp_rank = lay.coords(rank)
    tp_pass = pm.passes[1]
    return RankSpec(rank, stage, tp_rank, list(lay.stages[stage]), model_file, steps,
                    tp_pass.sharded_bytes + tp_pass.replicated_bytes, tp_pass.replicated_bytes)


def rank_config(cfg, lay: Layout):
    """The model config as one rank sees it (its heads and intermediate slice)."""
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // lay.tp, num_kv_heads=cfg.num_kv_heads // lay.tp,
                               intermediate_size=cfg.intermediate_size // lay.tp)


def emit_onnxruntime(recipe, arch, cfg, ckpt, facts, lay: Layout, tmp: Path, progress: bool, dump_ir: Path | None):
    """Every rank's files; returns (engine config, graph flavour, rank 0's PassManager, node count,
    plugin records)."""
    o = recipe.onnxruntime
    ranks, first_pm, nodes, records = [], None, 0, []
    rcfg = rank_config(cfg, lay)
    for r in range(lay.world_size):
        model, pm, records = rank_model(recipe, arch, cfg, ckpt, lay, r, dump_ir)
        first_pm, nodes = first_pm or pm, nodes or len(model.graph)
        if o.graph == "contrib":
            model = legalise(model, rcfg)
        name = f"rank{r}.onnx"
        ort_backend.save(model, tmp / name, f"{name}.data", progress)
        del model
        gc.collect()
        ranks.append(rank_spec(lay, r, name, write_parts(tmp / name, f"rank{r}"), pm))
    flavour = "ort-contrib" if o.graph == "contrib" else "standard"
    entries = {"session.qdq_matmulnbits_accuracy_level": str(o.int4_accuracy_level)}
    engine = EngineConfig(
        backend="onnxruntime", model_file="rank0.onnx",
        inputs=[TensorSpec("input_ids", "int64", ["batch", "seq"]), TensorSpec("position_ids", "int64", ["batch", "seq"]),
                TensorSpec("logits_positions", "int64", ["batch", "logits"])],
        outputs=[TensorSpec("logits", "float32", ["batch", "logits", cfg.vocab_size])],
        kv_cache=KVCacheSpec(cfg.num_layers, rcfg.num_kv_heads, cfg.head_dim, recipe.max_seq),
        max_batch=recipe.max_batch, max_seq=recipe.max_seq, vocab_size=cfg.vocab_size,
        session=SessionConfig(intra_op_threads=o.intra_op_threads, config_entries=entries),
        generation=facts.generation, graph_flavour=flavour,
        parallel=ParallelSpec(lay.tp, lay.pp, [list(s) for s in lay.stages], cfg.hidden_size, ranks),
    )
    (tmp / "engine.json").write_text(engine.to_json())
    return engine, f"{flavour} tp={lay.tp} pp={lay.pp}", first_pm, nodes, records


def emit(recipe, arch, cfg, ckpt, facts, lay: Layout, tmp: Path, progress: bool, dump_ir: Path | None):
    if recipe.backend == "tensorrt":
        from compiler.backends.tensorrt.ranks import emit_ranks

        models = (rank_model(recipe, arch, cfg, ckpt, lay, r, dump_ir) for r in range(lay.world_size))
        return emit_ranks(recipe, cfg, rank_config(cfg, lay), facts, lay, tmp, progress, models, rank_spec)
    return emit_onnxruntime(recipe, arch, cfg, ckpt, facts, lay, tmp, progress, dump_ir)


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
