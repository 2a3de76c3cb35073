"""`kiln build`: recipe -> checkpoint -> graph -> passes -> backend -> artifacts/<name>/.

Everything is written into a temp dir beside the destination and renamed into place at the
end, so a failed build leaves nothing behind. The manifest `kiln.json` records the resolved
recipe, the source digest, the sha256 of every file, the backend and its version, the I/O spec
and the build's time, peak memory and host.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import onnx_ir as ir
import onnxruntime

from compiler import __version__, build_cache, build_ranks
from compiler.backends.onnxruntime import backend as ort_backend
from compiler.backends.onnxruntime.legalise import legalise
from compiler.card import render as render_card
from compiler.errors import KilnError
from compiler.frontend import models
from compiler.memory import return_freed_memory
from compiler.frontend.checkpoint import Checkpoint
from compiler.frontend.sources import resolve_source
from compiler.fsutil import replace_dir
from compiler.passes import PassManager, make, plugin_ops
from compiler.recipe import Recipe
from compiler.runtime.config import GenerationDefaults, SessionConfig
from compiler.runtime.verify import record


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
    arch = models.lookup(ckpt.config)
    cfg = arch.config(ckpt.config)
    _check_tokenizer(ckpt)
    if recipe.max_seq > cfg.max_position_embeddings:
        raise KilnError(f"max_seq {recipe.max_seq} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}",
                        "lower max_seq in the recipe")
    task = getattr(arch, "TASK", "generate")
    if task == "embed" and (recipe.quantization is not None or recipe.backend != "onnxruntime"):
        raise KilnError(f"{arch.ARCH} is an encoder: kiln builds it for onnxruntime without quantization so far",
                        "remove quantization and set backend: onnxruntime")
    lay = build_ranks.layout(recipe, arch, cfg) if recipe.parallel.world_size > 1 else None  # before any work
    if recipe.backend == "tensorrt":
        from compiler.backends.tensorrt import backend as trt_backend

        trt_backend.check_recipe(recipe.quantization, cfg, recipe.tensorrt.targets)  # before calibration and any build work
    facts = ort_backend.ModelFacts(cfg.num_layers, getattr(cfg, "num_kv_heads", 0), cfg.head_dim, cfg.vocab_size,
                                   _generation(ckpt), task)
    model = arch.build(cfg, ckpt, recipe.max_seq)  # lazy: no weight is read yet
    ckpt.check_all_claimed(arch.IGNORED_WEIGHTS)  # before any work: a lying config.json is refused here
    pm, plugin_records, stages = None, [], {}
    if lay is not None:
        model = None  # each rank builds its own graph
    else:
        # quantisation before the plugins' rewrites: its smoothing finds its sinks in the graph it knows
        t = time.perf_counter()
        quant = _quant_passes(recipe, arch, cfg, ckpt, progress, digest)  # calibration, if the scheme has one
        stages["calibration_s"] = round(time.perf_counter() - t, 2)
        pm = PassManager(make(recipe.passes) + quant + plugin_ops.rewrite_passes(recipe), dump_dir=dump_ir)
        t = time.perf_counter()
        model = pm.run(model)
        stages["passes_s"] = round(time.perf_counter() - t, 2)
        model, plugin_records = plugin_ops.bind(model, recipe.backend)
        pm.passes.clear()  # the quantiser holds the calibration statistics: drop them (records stay)
        return_freed_memory()  # calibration's buffers, before the backend's own peak
        if recipe.backend == "tensorrt":
            trt_backend.check(model, facts, cfg.num_heads)
    dest = out_root / recipe.name
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.", suffix=".tmp", dir=out_root))
    t_emit = time.perf_counter()
    tmp.chmod(0o755)
    try:
        if lay is not None:
            engine, flavour, pm, nodes, plugin_records = build_ranks.emit(recipe, arch, cfg, ckpt, facts, lay, tmp, progress, dump_ir)
        elif recipe.backend == "tensorrt":
            engine = trt_backend.emit(model, facts, cfg.num_heads, tmp, recipe.tensorrt, max_batch=recipe.max_batch,
                                      max_seq=recipe.max_seq, progress=progress)
            flavour = f"tensorrt-network {engine.tensorrt.precision}"
        else:
            engine, flavour = _emit_onnxruntime(recipe, model, cfg, facts, tmp, progress)
        if recipe.speculative is not None and (tmp / "engine.json").is_file():  # the runtime's default
            engine = dataclasses.replace(engine, speculative=recipe.speculative.model_dump())
            (tmp / "engine.json").write_text(engine.to_json())
        for f in ckpt.tokenizer_files():
            shutil.copy2(f, tmp / f.name)
        nodes = len(model.graph) if model is not None else nodes
        del model  # the quality gate loads engines: free the graph first
        gc.collect()
        # a TensorRT engine cannot run here: its quality is that of the same graph on onnxruntime
        stages["emit_s"] = round(time.perf_counter() - t_emit, 2)
        t = time.perf_counter()
        gate = recipe.quantization and recipe.backend == "onnxruntime" and recipe.quality.gate
        quality = _quality_gate(recipe, tmp, source, progress) if gate else None
        stages["quality_gate_s"] = round(time.perf_counter() - t, 2)
        _log_plugins(plugin_records, tmp, progress)  # before the manifest hashes build.log
        manifest = _manifest(recipe, source, ckpt, arch, cfg, engine, flavour, nodes, pm, quality, t0, tmp)
        manifest["build"]["stages"] = stages
        manifest["task"], manifest["build_key"] = engine.task, build_key
        if lay is not None:
            manifest["parallel"] = build_ranks.manifest_section(engine, arch, cfg, ckpt, recipe.max_seq)
        manifest["plugins"] = plugin_records
        manifest["source"] = {"path": manifest["source"]["path"], "digest": digest, **manifest["source"]}
        card = tmp / "README.md"
        card.write_text(render_card(json.loads(json.dumps(manifest, default=str))))
        record(manifest, [card])
        (tmp / "kiln.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _emit_onnxruntime(recipe: Recipe, model, cfg, facts, tmp: Path, progress: bool):
    o = recipe.onnxruntime
    flavour = "standard"
    if o.precision != "float32":
        from compiler.passes.precision import ToHalf

        half = ToHalf(ir.DataType.FLOAT16 if o.precision == "float16" else ir.DataType.BFLOAT16)
        model = PassManager([half]).run(model)
        flavour = o.precision
    if o.graph == "contrib":
        model = legalise(model, cfg)
        flavour = f"ort-contrib {flavour}" if o.precision != "float32" else "ort-contrib"
    entries = {"session.qdq_matmulnbits_accuracy_level": str(o.int4_accuracy_level)}
    if recipe.quantization is not None and recipe.quantization.scheme == "fp8":
        # ORT 1.31 fuses Q/DQ + MatMul into MatMulIntegerToFloat, which rejects float8: keep QDQ as is
        entries["session.disable_quant_qdq"] = "1"
    session = SessionConfig(intra_op_threads=o.intra_op_threads, config_entries=entries)
    if o.device == "cuda":
        session = cuda_session_config(o, entries)
    engine = ort_backend.emit(model, facts, tmp, max_batch=recipe.max_batch, max_seq=recipe.max_seq,
                              session=session, graph_flavour=flavour, progress=progress)
    return engine, flavour


def _manifest(recipe: Recipe, source: Path, ckpt: Checkpoint, arch, cfg, engine, flavour: str, nodes: int,
              pm: PassManager, quality: dict | None, t0: float, tmp: Path) -> dict:
    """kiln.json: what went in (recipe, source digest), what came out (I/O, files) and the build's cost."""
    return {
        "kiln_version": __version__,
        "name": recipe.name,
        "recipe": recipe.resolved(),
        "source": {"path": str(source), "architecture": models.arch_name(ckpt.config), "config": asdict(cfg)},
        "backend": _backend_record(engine, flavour),
        "io": {"inputs": [asdict(s) for s in engine.inputs], "outputs": [asdict(s) for s in engine.outputs]},
        "graph": {"nodes": nodes, "passes": [asdict(r) for r in pm.records]},
        "quantization": recipe.quantization.model_dump(mode="json") if recipe.quantization else None,
        "quality": quality,
        "build": {
            "seconds": round(time.perf_counter() - t0, 2),
            # this process only: the quality gate's fp32 reference is built in a child process
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "cpu": cpu_description(),  # quantised results are compared across machines by these
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
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


def cuda_session_config(o, entries: dict) -> SessionConfig:
    """CUDA EP options chosen by kiln: no cuDNN algorithm search (no convolutions here), an arena
    that grows by what is asked (the KV cache is allocated once), copies on the compute stream,
    and CUDA graphs enabled for the decode step (the runtime picks a graph id per batch size)."""
    options = {"device_id": str(o.device_id), "arena_extend_strategy": "kSameAsRequested",
               "cudnn_conv_algo_search": "DEFAULT", "do_copy_in_default_stream": "1",
               "enable_cuda_graph": "1" if o.cuda_graph else "0"}
    return SessionConfig(execution_provider="CUDAExecutionProvider", intra_op_threads=1, config_entries=entries,
                         provider_options=options, cuda_graph=o.cuda_graph)


def _backend_record(engine, flavour: str) -> dict:
    if engine.tensorrt is not None:
        t = engine.tensorrt
        return {"name": t.flavour, "version": t.version, "graph": flavour, "precision": t.precision,
                "targets": t.targets, "profiles": t.profiles}
    return {"name": "onnxruntime", "version": onnxruntime.__version__, "graph": flavour}


def _backend_version(recipe: Recipe) -> str:
    if recipe.backend == "tensorrt":
        from compiler.backends.tensorrt import trt_module

        f = trt_module.load(recipe.tensorrt.module)
        return f"{f.name} {f.version}"
    return f"onnxruntime {onnxruntime.__version__}"


def _quant_passes(recipe: Recipe, arch, cfg, ckpt: Checkpoint, progress: bool, digest: str | None = None) -> list:
    """The recipe's quantisation pass (after calibration, if its scheme needs it) and a cleanup."""
    if recipe.quantization is None:
        return []
    from compiler.passes.cleanup import DeadCodeElimination
    from compiler.passes.quant import needs_calibration, quantizer

    stats = None
    if needs_calibration(recipe.quantization):
        from compiler.passes.quant.calibrate_model import calibrate

        stats = calibrate(recipe, arch, cfg, ckpt, progress, source_digest=digest)
    gguf = _gguf_source(recipe, cfg, ckpt) if recipe.quantization.scheme == "gguf" else None
    level4, trt = recipe.onnxruntime.int4_accuracy_level == 4, recipe.backend == "tensorrt"
    return [quantizer(recipe.quantization, stats, gguf, level4 and not trt, trt), DeadCodeElimination()]


def _gguf_source(recipe: Recipe, cfg, ckpt: Checkpoint):
    """The GGUF file whose grids the gguf scheme keeps: `file`, else the recipe's .gguf source."""
    from compiler.passes.quant.gguf import GgufSource

    file = recipe.quantization.file or recipe.source
    path = Path(file).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise KilnError(f"quantization scheme gguf needs a .gguf file; {file} is not one",
                        "set source: to the .gguf file (or quantization.file: to the one the checkpoint came from)")
    source = GgufSource(path, ckpt, (getattr(cfg, "num_heads", 0), getattr(cfg, "num_kv_heads", 0)))
    _ = source.tensors  # opened now: a file that is not a GGUF is refused before any work
    return source


def _quality_gate(recipe: Recipe, artifact: Path, source: Path, progress: bool) -> dict:
    """Perplexity, top-1 agreement and KL vs the fp32 engine; a violated limit fails the build."""
    from compiler.evaluate import evaluate

    q = recipe.quality
    res = evaluate(artifact, reference=source, text_path=Path(q.text) if q.text else None, window=q.window, progress=progress)
    figures = res.to_dict()
    figures["ppl_increase_pct"] = 100.0 * (res.perplexity / res.reference_perplexity - 1.0)
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
