"""Compiling an engine: recipe + checkpoint -> the pipeline on each rank's graph -> the backend's files.

    prep = prepare(recipe, source, ckpt, digest, build_key)   # every refusal that needs no work
    result = compile_into(recipe, prep, out, dump_ir, progress)  # graph -> passes -> backend, into out
    result = compile_engine(recipe, out)                       # both, and the tokenizer: a loadable engine

`kiln build` (build/driver.py) wraps these with the quality gate, kiln.json and the atomic rename;
the quality gate builds its fp32 reference with `compile_engine`, in this process, through the
same pipeline (build/evaluate.py).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from compiler import backends
from compiler.backends.base import ModelFacts
from compiler.build import cache as build_cache, pipeline, ranks as build_ranks
from compiler.memory import return_freed_memory
from compiler.build.recipe import Recipe
from compiler.errors import KilnError
from compiler.frontend import models
from compiler.frontend.checkpoint import Checkpoint
from compiler.frontend.sharding import Layout
from compiler.frontend.sources import open_source
from compiler.passes import PassManager, plugin_ops
from compiler.passes.base import PassRecord
from compiler.passes.prune import prune_checkpoint
from compiler.runtime.config import EngineConfig, GenerationDefaults
from compiler.runtime.text import Text
from compiler.runtime import tools


@dataclass
class Prepared:
    """The build's inputs once every refusal that needs no build work has passed."""

    source: Path
    ckpt: Checkpoint
    digest: str
    build_key: str
    arch: models.Architecture
    cfg: object  # the architecture's config dataclass
    facts: ModelFacts
    layout: Layout | None  # tp x pp, or None for a single-rank build
    model: ir.Model | None  # the frontend's graph (lazy weights), single-rank builds only
    tools: dict | None = None  # how the chat template carries tool calls (runtime/tools.py); None: no template
    pruned: dict | None = None  # what structured pruning removed (passes/prune.py)


@dataclass
class BuildResult:
    """What compiling produced, for kiln.json."""

    engine: EngineConfig
    backend: dict  # kiln.json `backend`
    nodes: int  # rank 0's graph as emitted
    passes: list[PassRecord]  # rank 0's pipeline, every pass
    plugins: list[dict]  # one record per plugin op type
    stages: dict = field(default_factory=dict)  # seconds per build stage
    quality: dict | None = None


def prepare(recipe: Recipe, source: Path, ckpt: Checkpoint, digest: str, build_key: str, progress: bool = False) -> Prepared:
    """Every refusal that needs no build work: the model, its tokenizer, the recipe's limits,
    the parallel layout and the backend's recipe rules; then the pruning the recipe asks for."""
    arch = models.lookup(ckpt.config)
    cfg = arch.config(ckpt.config)
    tools = _check_tokenizer(ckpt) if arch.task == "generate" else None
    if recipe.max_seq > cfg.max_position_embeddings:
        raise KilnError(f"max_seq {recipe.max_seq} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}",
                        "lower max_seq in the recipe")
    if arch.task == "embed" and (recipe.quantization is not None or recipe.backend != "onnxruntime"):
        raise KilnError(f"{arch.name} is an encoder: kiln builds it for onnxruntime without quantization so far",
                        "remove quantization and set backend: onnxruntime")
    lay = build_ranks.layout(recipe, arch, cfg) if recipe.parallel.world_size > 1 else None
    if recipe.backend == "tensorrt":
        from compiler.backends.tensorrt import backend as trt_backend

        trt_backend.check_recipe(recipe.quantization, cfg, recipe.tensorrt.targets)  # before calibration
    if recipe.prune is not None and arch.task == "embed":
        raise KilnError(f"{arch.name} is an encoder: kiln prunes decoders", "remove prune from the recipe")
    pruned = None
    if recipe.prune is not None:  # calibrates the unpruned model, then builds from the pruned view
        ckpt, pruned = prune_checkpoint(recipe.prune, arch, ckpt, progress)
        cfg = arch.config(ckpt.config)
    facts = ModelFacts(cfg.num_layers, getattr(cfg, "num_kv_heads", 0), cfg.head_dim, cfg.vocab_size, _generation(ckpt), arch.task)
    model = arch.build(cfg, ckpt, recipe.max_seq)  # lazy: no weight is read yet
    ckpt.check_all_claimed(arch.ignored_weights)  # a lying config.json is refused here
    return Prepared(source, ckpt, digest, build_key, arch, cfg, facts, lay, model if lay is None else None, tools, pruned)


def compile_into(recipe: Recipe, prep: Prepared, out: Path, dump_ir: Path | None, progress: bool) -> BuildResult:
    """Run the build pipeline on each rank's graph, have the backend write it into `out`, and copy
    the tokenizer beside it: `out` then holds a loadable engine (no kiln.json yet)."""
    ctx = pipeline.Context(prep.arch, prep.cfg, prep.ckpt, prep.digest, progress)
    managers: list[PassManager] = []
    defaults = {k: getattr(recipe, k).model_dump(exclude_none=k == "serve") for k in ("speculative", "serve")
                if getattr(recipe, k) is not None}
    t = time.perf_counter()
    if prep.layout is None:
        backend = backends.make(recipe, prep.facts, getattr(prep.cfg, "num_heads", 0), progress)
        emitted = backends.emit(backend, _single_rank(recipe, prep, ctx, dump_ir, managers), 1, out, runtime_defaults=defaults)
    else:
        lay, rcfg = prep.layout, build_ranks.rank_config(prep.cfg, prep.layout)
        backend = backends.make(recipe, dataclasses.replace(prep.facts, num_kv_heads=rcfg.num_kv_heads), rcfg.num_heads, progress)
        models_ = build_ranks.rank_models(recipe, prep.arch, prep.cfg, prep.ckpt, lay, ctx, dump_ir, managers)
        emitted = backends.emit(backend, models_, lay.world_size, out, runtime_defaults=defaults,
                                rank_spec=lambda r, o: build_ranks.rank_spec(lay, r, o, managers[r]),
                                parallel=lambda ranks: build_ranks.parallel_spec(lay, prep.cfg, ranks))
    pm = managers[0]
    calibration = sum(getattr(p, "calibration_s", 0.0) for p in pm.passes)
    passes_s = sum(r.seconds for m in managers for r in m.records) - calibration
    stages = {"calibration_s": round(calibration, 2), "passes_s": round(passes_s, 2),
              "emit_s": round(time.perf_counter() - t - calibration - passes_s, 2)}
    plugins = next((p.records for p in pm.passes if isinstance(p, plugin_ops.BindPlugins)), [])
    _log_plugins(plugins, out, progress)  # before the manifest hashes build.log
    for f in prep.ckpt.tokenizer_files():
        shutil.copy2(f, out / f.name)
    return BuildResult(emitted.engine, backend.record(emitted.engine), emitted.first_model_nodes, pm.records, plugins, stages)


def _single_rank(recipe: Recipe, prep: Prepared, ctx: pipeline.Context, dump_ir: Path | None, managers: list):
    """The one graph of a single-rank build after the whole pipeline."""
    pm = PassManager(pipeline.plan(recipe, ctx), dump_dir=dump_ir)
    managers.append(pm)
    model, prep.model = prep.model, None
    model = pm.run(model)
    return_freed_memory()  # calibration's buffers, before the backend's own peak
    yield model


def list_passes(recipe: Recipe) -> list[tuple[str, str]]:
    """The build's pipeline as (name, what it does), without reading a weight or calibrating."""
    source, ckpt = open_source(recipe.source, recipe.adapter_list())
    arch = models.lookup(ckpt.config)
    cfg = arch.config(ckpt.config)
    ctx = pipeline.Context(arch, cfg, ckpt, progress=False)
    if recipe.parallel.world_size > 1:
        return pipeline.describe(build_ranks.rank_plan(recipe, arch, cfg, build_ranks.layout(recipe, arch, cfg), ctx, 0))
    return pipeline.describe(pipeline.plan(recipe, ctx))


def _generation(ckpt: Checkpoint) -> GenerationDefaults:
    """Special token ids from generation_config.json (else config.json), each a token id or refused."""
    gen, cfg = ckpt.generation_config, ckpt.config

    def ids(key: str) -> list[int]:
        v = gen.get(key, cfg.get(key))
        values = [] if v is None else v if isinstance(v, list) else [v]
        bad = [x for x in values if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < (1 << 31)]
        if bad:
            raise KilnError(f"{ckpt.root}: {key}={v!r} is not a token id (or a list of them)",
                            f"fix {key} in generation_config.json / config.json")
        return values

    eos, bos, pad = ids("eos_token_id"), ids("bos_token_id"), ids("pad_token_id")
    return GenerationDefaults(bos_token_id=bos[0] if bos else None, eos_token_ids=eos, pad_token_id=(pad or eos or [0])[0])


def _check_tokenizer(ckpt: Checkpoint) -> dict | None:
    """Load the tokenizer files as the runtime will (and render a one-message chat through the
    template), so an artifact that `kiln run` cannot load is never built; returns how the template
    carries tool calls (None without a chat template)."""
    if not (ckpt.root / "tokenizer.json").is_file():
        raise KilnError(f"{ckpt.root} has no tokenizer.json", "add the model's tokenizer.json (a fast tokenizer) to the checkpoint")
    try:
        text = Text(ckpt.root)
        if text.chat_template:
            text.prompt_ids([{"role": "user", "content": "Hello"}], chat=True)
    except Exception as e:  # noqa: BLE001  (tokenizers raises its own exception types)
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise KilnError(f"{ckpt.root}: the tokenizer files do not load ({why})", "fix or re-download tokenizer.json, "
                        "tokenizer_config.json and the chat template") from None
    return tool_record(text) if text.chat_template else None


def tool_record(text: Text) -> dict:
    """The chat template's tool-call format, after rendering a whole round trip through it (a tool
    list, a call, its result) and parsing the call back; {"format": "unsupported", "why"} if not."""
    fmt, why = tools.usable_format(text)
    if fmt is None:
        return {"format": "unsupported", "why": why}
    return {"format": fmt.source, "start": fmt.start, "end": fmt.end, "arguments_key": fmt.args_key}


def _log_plugins(records: list[dict], tmp: Path, progress: bool) -> None:
    """The plugin fallbacks, in the build log (TensorRT's build.log, appended) and on stderr."""
    lines = [f"[WARNING] plugin {r['op']}: {r['nodes']} nodes run as its decomposition ({r['why']})" for r in records]
    if not lines:
        return
    if (tmp / "build.log").is_file():
        with open(tmp / "build.log", "a") as f:
            f.write("\n".join(lines) + "\n")
    if progress:
        print("\n".join(lines), file=sys.stderr)


def compile_engine(recipe: Recipe, out: Path, progress: bool = False) -> BuildResult:
    """A runnable engine of `recipe` in `out` (the backend's files and the tokenizer; no gate,
    no kiln.json): what the quality gate compares against."""
    source, ckpt = open_source(recipe.source, recipe.adapter_list())
    digest = build_cache.source_digest(ckpt)
    prep = prepare(recipe, source, ckpt, digest, build_cache.key(recipe.resolved(), digest))
    result = compile_into(recipe, prep, out, None, progress)
    del prep
    return_freed_memory()  # the build's buffers, before engines load
    return result
