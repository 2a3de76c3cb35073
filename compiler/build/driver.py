"""`kiln build`: recipe -> checkpoint -> graph -> passes -> backend -> artifacts/<name>/.

build() = prepare (every refusal that needs no work) -> compile_into (the pipeline of
compiler/build/pipeline.py on each rank's graph, then the backend's rank loop) -> the quality gate ->
kiln.json. Everything is written into a temp dir beside the destination and renamed into place at the
end, so a failed build leaves nothing behind. The manifest `kiln.json` records the resolved
recipe, the source digest, the sha256 of every file, the backend and its version, the I/O spec
and the build's time, peak memory and host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import onnx_ir as ir
import onnxruntime

from compiler import __version__, backends
from compiler.build import cache as build_cache, pipeline, ranks as build_ranks
from compiler.backends.base import ModelFacts
from compiler.build.card import render as render_card
from compiler.errors import KilnError
from compiler.frontend import models
from compiler.frontend.checkpoint import Checkpoint
from compiler.frontend.sharding import Layout
from compiler.frontend.sources import resolve_source
from compiler.fsutil import replace_dir
from compiler.build.memory import return_freed_memory
from compiler.passes import PassManager, plugin_ops
from compiler.passes.base import PassRecord
from compiler.build.recipe import Recipe
from compiler.runtime.config import EngineConfig, GenerationDefaults
from compiler.runtime.verify import record

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


def build(recipe: Recipe, out_root: Path, *, dump_ir: Path | None = None, progress: bool = True, force: bool = False) -> dict:
    """Build `recipe` into out_root/<name>; returns the manifest. An artifact built from the same
    recipe, source, kiln and backend versions and still intact is kept (its manifest gets
    "up_to_date": true) unless force."""
    t0 = time.perf_counter()
    source = resolve_source(recipe.source)
    ckpt = Checkpoint.open(source)
    digest = build_cache.source_digest(ckpt)
    build_key = build_cache.key(recipe.resolved(), digest, _backend_version(recipe))
    if not force and dump_ir is None and (done := build_cache.up_to_date(out_root / recipe.name, build_key)) is not None:
        return {**done, "up_to_date": True}
    prep = prepare(recipe, source, ckpt, digest, build_key)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.", suffix=".tmp", dir=out_root))
    tmp.chmod(0o755)
    try:
        result = compile_into(recipe, prep, tmp, dump_ir, progress)
        for f in ckpt.tokenizer_files():
            shutil.copy2(f, tmp / f.name)
        t = time.perf_counter()
        if recipe.quantization and recipe.backend == "onnxruntime" and recipe.quality.gate:
            # a TensorRT engine cannot run here: its quality is that of the same graph on onnxruntime
            result.quality = _quality_gate(recipe, tmp, source, progress)
        result.stages["quality_gate_s"] = round(time.perf_counter() - t, 2)
        manifest = _write_manifest(recipe, prep, result, t0, tmp)
        replace_dir(tmp, out_root / recipe.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def prepare(recipe: Recipe, source: Path, ckpt: Checkpoint, digest: str, build_key: str) -> Prepared:
    """Every refusal that needs no build work: the model, its tokenizer, the recipe's limits,
    the parallel layout and the backend's recipe rules."""
    arch = models.lookup(ckpt.config)
    cfg = arch.config(ckpt.config)
    _check_tokenizer(ckpt)
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
    facts = ModelFacts(cfg.num_layers, getattr(cfg, "num_kv_heads", 0), cfg.head_dim, cfg.vocab_size, _generation(ckpt), arch.task)
    model = arch.build(cfg, ckpt, recipe.max_seq)  # lazy: no weight is read yet
    ckpt.check_all_claimed(arch.ignored_weights)  # a lying config.json is refused here
    return Prepared(source, ckpt, digest, build_key, arch, cfg, facts, lay, model if lay is None else None)


def compile_into(recipe: Recipe, prep: Prepared, out: Path, dump_ir: Path | None, progress: bool) -> BuildResult:
    """Run the build pipeline on each rank's graph and have the backend write it into `out`."""
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
    source = resolve_source(recipe.source)
    ckpt = Checkpoint.open(source)
    arch = models.lookup(ckpt.config)
    cfg = arch.config(ckpt.config)
    ctx = pipeline.Context(arch, cfg, ckpt, progress=False)
    if recipe.parallel.world_size > 1:
        return pipeline.describe(build_ranks.rank_plan(recipe, arch, cfg, build_ranks.layout(recipe, arch, cfg), ctx, 0))
    return pipeline.describe(pipeline.plan(recipe, ctx))


def _write_manifest(recipe: Recipe, prep: Prepared, result: BuildResult, t0: float, tmp: Path) -> dict:
    """kiln.json and the engine card, written into tmp last (they hash every other file)."""
    manifest = _manifest(recipe, prep, result, t0, tmp)
    if prep.layout is not None:
        manifest["parallel"] = build_ranks.manifest_section(result.engine, prep.arch, prep.cfg, prep.ckpt, recipe.max_seq)
    card = tmp / "README.md"
    card.write_text(render_card(json.loads(json.dumps(manifest, default=str))))
    record(manifest, [card])
    (tmp / "kiln.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def _manifest(recipe: Recipe, prep: Prepared, result: BuildResult, t0: float, tmp: Path) -> dict:
    """kiln.json: what went in (recipe, source digest), what came out (I/O, files) and the build's cost."""
    engine = result.engine
    return {
        "kiln_version": __version__,
        "name": recipe.name,
        "recipe": recipe.resolved(),
        "source": {"path": str(prep.source), "digest": prep.digest, "architecture": models.arch_name(prep.ckpt.config), "config": asdict(prep.cfg)},
        "backend": result.backend,
        "io": {"inputs": [asdict(s) for s in engine.inputs], "outputs": [asdict(s) for s in engine.outputs]},
        "graph": {"nodes": result.nodes, "passes": [asdict(r) for r in result.passes]},
        "quantization": recipe.quantization.model_dump(mode="json") if recipe.quantization else None,
        "quality": result.quality,
        "build": {
            "seconds": round(time.perf_counter() - t0, 2),
            # this process only: the quality gate's fp32 reference is built in a child process
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "cpu": cpu_description(),  # quantised results are compared across machines by these
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stages": result.stages,
        },
        "task": engine.task,
        "build_key": prep.build_key,
        "plugins": result.plugins,
    } | record({}, sorted(tmp.iterdir()))  # "files": {name: sha256}, "sizes": {name: bytes}


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
              "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_description() -> dict:
    """The build machine's CPU model and the ISA flags its kernels may choose between."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model name") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "isa": [f for f in _ISA_FLAGS if f in flags], "cores": os.cpu_count()}


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


def _backend_version(recipe: Recipe) -> str:
    if recipe.backend == "tensorrt":
        from compiler.backends.tensorrt import trt_module

        f = trt_module.load(recipe.tensorrt.module)
        return f"{f.name} {f.version}"
    return f"onnxruntime {onnxruntime.__version__}"


def _quality_gate(recipe: Recipe, artifact: Path, source: Path, progress: bool) -> dict:
    """Perplexity, top-1 agreement and KL vs the fp32 engine; a violated limit fails the build."""
    from compiler.build.evaluate import evaluate

    q = recipe.quality
    res = evaluate(artifact, reference=source, text_path=Path(q.text) if q.text else None, window=q.window, progress=progress)
    figures = res.to_dict()
    failed = []
    if q.max_ppl_increase_pct is not None and figures["ppl_increase_pct"] > q.max_ppl_increase_pct:
        failed.append(f"perplexity +{figures['ppl_increase_pct']:.2f}% > +{q.max_ppl_increase_pct}%")
    if q.min_top1_agreement is not None and res.top1_agreement < q.min_top1_agreement:
        failed.append(f"top-1 agreement {res.top1_agreement:.4f} < {q.min_top1_agreement}")
    summary = (f"quality: perplexity {res.perplexity:.3f} vs fp32 {res.reference_perplexity:.3f} "
               f"({figures['ppl_increase_pct']:+.2f}%), top-1 agreement {res.top1_agreement:.4f}, mean KL {res.mean_kl:.5f}")
    if failed:
        raise KilnError(f"{recipe.name}: quality limit violated: {'; '.join(failed)} [{summary}]",
                        "relax quality limits in the recipe or choose a more precise scheme")
    if progress:
        print(summary, file=sys.stderr)
    return figures


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


def _check_tokenizer(ckpt: Checkpoint) -> None:
    """Load the tokenizer files as the runtime will (and render a one-message chat through the
    template), so an artifact that `kiln run` cannot load is never built."""
    from compiler.runtime.text import Text

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
