"""The build pipeline: a recipe resolved into one ordered list of named passes.

    stage         passes                                     when
    parallel      pipeline_stage, tensor_parallel            one rank of a tp x pp build
    frontend      the recipe's `passes` (merge_qkv, ...)      always
    quantisation  quantize_<scheme> (calibrates first), dce  quantization: in the recipe
    plugins       each plugin's rewrite (rmsnorm_residual...) plugins: in the recipe
    kernels       fuse_paged_attention (kv rows of any dtype) kv_cache: {attention: kiln}
    bind          bind_plugins (bound, or decomposed)        plugins:, or kiln's attention
    precision     to_float16 | to_bfloat16                   onnxruntime, precision not float32
    legalise      legalise_onnxruntime                       onnxruntime, graph: contrib

Single-rank and multi-rank builds take their passes from `plan`, and calibration graphs from
`calibration_plan` (the frontend stage of the same plan), each run through one PassManager, so
`--dump-ir` dumps after every pass and kiln.json records every one.
Quantisation sits before the plugins' rewrites so its smoothing finds the sinks it knows, and
binding before legalisation so a decomposed plugin op is fused like the graph it replaced. The
backend's own rules are checked after the last pass (Backend.check, compiler/backends/base.py).
Nothing here reads a weight or calibrates: `kiln build --list-passes` prints the plan as is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx_ir as ir

from compiler.build import cache as build_cache
from compiler.frontend.models.architecture import Architecture
from compiler.passes import plugin_ops, recipe_passes
from compiler.passes.quant.calibrate_model import calibrate
from compiler.passes.base import Pass, PassResult
from plugins.paged_attention.rewrite import FusePagedAttention


@dataclass(frozen=True)
class Context:
    """What the quantisation pass needs to calibrate (read when it runs, never at plan time)."""

    arch: Architecture
    cfg: object  # the architecture's typed config (a rank's, in a tp build)
    ckpt: object  # compiler.frontend.checkpoint.Checkpoint
    digest: str | None = None  # the source digest: calibration statistics are cached under it
    progress: bool = True


def plan(recipe, ctx: Context, rank_passes: list[Pass] = ()) -> list[Pass]:
    """Every pass of the build of `recipe` in order (rank_passes: a rank's parallel split)."""
    passes = [*rank_passes, *_frontend(recipe)]
    if recipe.quantization is not None:
        from compiler.passes.cleanup import DeadCodeElimination

        passes += [Quantize(recipe, ctx), DeadCodeElimination()]
    passes += plugin_ops.rewrite_passes(recipe)
    kv = recipe.kv_cache
    if kv.kernel == "kiln":
        passes.append(FusePagedAttention(kv.engine_dtype, (ctx.cfg.num_heads, ctx.cfg.num_kv_heads)))
    if recipe.plugins or kv.kernel == "kiln":
        passes.append(plugin_ops.BindPlugins(recipe.backend))
    if recipe.backend == "onnxruntime":
        passes += _onnxruntime_passes(recipe, ctx.cfg)
    return passes


def _frontend(recipe) -> list[Pass]:
    return recipe_passes(recipe.passes)


def calibration_plan(recipe) -> list[Pass]:
    """The passes of the graph calibration runs: the plan's frontend stage, so its MatMul names are
    those the quantiser then sees; without shape inference (the sample's shapes are not the engine's)."""
    return [p for p in _frontend(recipe) if p.name != "shape_inference"]


def _onnxruntime_passes(recipe, cfg) -> list[Pass]:
    o = recipe.onnxruntime
    out = []
    if o.precision != "float32":
        from compiler.passes.precision import ToHalf

        out.append(ToHalf(ir.DataType.FLOAT16 if o.precision == "float16" else ir.DataType.BFLOAT16))
    if o.graph == "contrib":
        from compiler.backends.onnxruntime.legalise import LegaliseOnnxRuntime

        out.append(LegaliseOnnxRuntime(cfg))
    return out


def describe(passes: list[Pass]) -> list[tuple[str, str]]:
    """(name, what it does) of each pass, for `kiln build --list-passes`."""
    return [(p.name, p.describe()) for p in passes]


class Quantize(Pass):
    """Quantise the linears with the recipe's scheme (calibrating first when the scheme needs it)."""

    def __init__(self, recipe, ctx: Context):
        from compiler.passes.quant import scheme_pass_name

        self.recipe, self.ctx = recipe, ctx
        self.name = scheme_pass_name(recipe.quantization)
        self.calibration_s = 0.0

    def describe(self) -> str:
        q = self.recipe.quantization
        cal = getattr(q, "calibration", None)
        first = f"calibrate on {cal.samples} x {cal.seq_len} tokens of {cal.source}, then " if cal is not None else ""
        return f"{first}quantise every linear with scheme {q.scheme} (overrides: {len(q.overrides)})"

    def run(self, model: ir.Model) -> PassResult:
        from compiler.passes.quant import needs_calibration, quantizer

        q, ctx = self.recipe.quantization, self.ctx
        stats = None
        if needs_calibration(q):
            t = time.perf_counter()
            stats = self._statistics()
            self.calibration_s = time.perf_counter() - t
        gguf = _gguf_source(self.recipe, ctx) if q.scheme == "gguf" else None
        level4, trt = self.recipe.onnxruntime.int4_accuracy_level == 4, self.recipe.backend == "tensorrt"
        result = quantizer(q, stats, gguf, level4 and not trt, trt).run(model)
        del stats  # the statistics die with this pass: nothing holds them into the backend's peak
        return result

    def _statistics(self) -> dict:
        """Calibration statistics of the calibration plan's graph, shared through the build cache by
        every recipe with the same source, calibration settings and passes (when the digest is known)."""
        ctx, passes = self.ctx, calibration_plan(self.recipe)
        cal = self.recipe.quantization.calibration
        key = build_cache.key("calibration", ctx.digest, cal.model_dump(mode="json"), [p.name for p in passes]) if ctx.digest else None
        if key and (cached := build_cache.load_stats(key)) is not None:
            return cached
        stats = calibrate(self.recipe, ctx.arch, ctx.cfg, ctx.ckpt, passes, ctx.progress)
        if key:
            build_cache.save_stats(key, stats)
        return stats


def _gguf_source(recipe, ctx: Context):
    from compiler.passes.quant.gguf import open_source

    return open_source(recipe, ctx.cfg, ctx.ckpt)
