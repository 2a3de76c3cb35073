"""`kiln build`: recipe -> checkpoint -> graph -> passes -> backend -> artifacts/<name>/.

build() = prepare (every refusal that needs no work) -> compile_into (the pipeline of
build/pipeline.py on each rank's graph, then the backend's rank loop; build/compile.py) -> the
quality gate (build/gate.py) -> kiln.json. Everything is written into a temp dir beside the destination and renamed into place at the
end, so a failed build leaves nothing behind. The manifest `kiln.json` records the resolved
recipe, the source digest, the sha256 of every file, the backend and its version, the I/O spec
and the build's time, peak memory and host.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import socket
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import onnxruntime

from compiler import __version__
from compiler.build import cache as build_cache, ranks as build_ranks
from compiler.build.card import render as render_card
from compiler.build.compile import BuildResult, Prepared, compile_into, list_passes, prepare
from compiler.build.gate import quality_gate
from compiler.build.recipe import Recipe
from compiler.runtime.kv_memory import SCALED, bytes_per_token
from compiler.frontend import models
from compiler.frontend.sources import open_source
from compiler.fsutil import replace_dir
from compiler.runtime.manifest import Manifest, write_manifest
from compiler.runtime.verify import record

__all__ = ["build", "cpu_description", "list_passes"]


def build(recipe: Recipe, out_root: Path, *, dump_ir: Path | None = None, progress: bool = True, force: bool = False) -> dict:
    """Build `recipe` into out_root/<name>; returns the manifest. An artifact built from the same
    recipe, source, kiln and backend versions and still intact is kept (its manifest gets
    "up_to_date": true) unless force."""
    t0 = time.perf_counter()
    source, ckpt = open_source(recipe.source, recipe.adapter_list())
    digest = build_cache.source_digest(ckpt)
    build_key = build_cache.key(recipe.resolved(), digest, _backend_version(recipe))
    if not force and dump_ir is None and (done := build_cache.up_to_date(out_root / recipe.name, build_key)) is not None:
        return {**done, "up_to_date": True}
    prep = prepare(recipe, source, ckpt, digest, build_key, progress)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.", suffix=".tmp", dir=out_root))
    tmp.chmod(0o755)
    try:
        result = compile_into(recipe, prep, tmp, dump_ir, progress)
        t = time.perf_counter()
        changed = recipe.quantization or recipe.kv_cache.dtype != "fp32" or prep.pruned is not None
        if changed and recipe.backend == "onnxruntime" and recipe.quality.gate:
            # a TensorRT engine cannot run here: its quality is that of the same graph on onnxruntime
            result.quality = quality_gate(recipe, tmp, source, progress)
        result.stages["quality_gate_s"] = round(time.perf_counter() - t, 2)
        manifest = _write_manifest(recipe, prep, result, t0, tmp)
        replace_dir(tmp, out_root / recipe.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_manifest(recipe: Recipe, prep: Prepared, result: BuildResult, t0: float, tmp: Path) -> dict:
    """kiln.json and the engine card, written into tmp last (they hash every other file)."""
    manifest = _manifest(recipe, prep, result, t0, tmp)
    if prep.layout is not None:
        manifest["parallel"] = build_ranks.manifest_section(result.engine, prep.arch, prep.cfg, prep.ckpt, recipe.max_seq)
    card = tmp / "README.md"
    card.write_text(render_card(json.loads(json.dumps(manifest, default=str))))
    record(manifest, [card])
    write_manifest(tmp, Manifest.from_dict(manifest))
    return manifest


def _kv_record(recipe: Recipe, engine) -> dict | None:
    """What the KV rows hold: the dtype, the kernel that reads them and the bytes a token costs."""
    kv = engine.kv_cache
    if kv is None:
        return None
    return {"dtype": kv.dtype, "attention": recipe.kv_cache.kernel, "scaled": kv.dtype in SCALED,
            "bytes_per_token": bytes_per_token(kv)}


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
            # this process, the quality gate's in-process fp32 reference build included
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
        "kv_cache": _kv_record(recipe, engine),
        "tools": prep.tools,
        "adapters": [a.record() for a in prep.ckpt.adapters],  # LoRA adapters merged into the weights
        "pruned": prep.pruned,  # structured pruning: what was removed
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


def _backend_version(recipe: Recipe) -> str:
    if recipe.backend == "tensorrt":
        from compiler.backends.tensorrt import trt_module

        f = trt_module.load(recipe.tensorrt.module)
        return f"{f.name} {f.version}"
    return f"onnxruntime {onnxruntime.__version__}"


