"""Build recipes: `recipes/*.yaml`, a versioned schema validated with pydantic.

A bad recipe fails with the file, the field and the reason, e.g.
`recipes/x.yaml: field 'max_seq': Input should be greater than 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from compiler.backends.tensorrt.options import TensorRTOptions
from compiler.config_base import StrictModel, load_mapping
from compiler.errors import KilnError
from compiler.passes.quant import QuantConfig
from compiler.passes.quant.base import Calibration

SCHEMA_VERSION = 1


class OnnxRuntimeOptions(StrictModel):
    # "contrib": legalise to ONNX Runtime's fused CPU kernels; "standard": keep the standard-op graph
    graph: Literal["contrib", "standard"] = "contrib"
    intra_op_threads: int = Field(0, ge=0, description="0 = physical cores of the machine that loads the engine")
    # MatMulNBits compute for int4 weights: 0 = fp32 activations, 4 = int8 activations (fastest)
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    device: Literal["cpu", "cuda"] = "cpu"  # cuda: the CUDA execution provider (kiln[cuda] = onnxruntime-gpu)
    precision: Literal["float32", "float16", "bfloat16"] = "float32"  # engine dtype; half types need device: cuda
    device_id: int = Field(0, ge=0)
    cuda_graph: bool = Field(True, description="cuda: capture the decode step in a CUDA graph per batch size")

    @model_validator(mode="after")
    def _half_needs_cuda(self):
        if self.precision != "float32" and self.device != "cuda":
            raise ValueError(f"precision {self.precision} needs device: cuda (the CPU provider computes half types in fp32)")
        return self


KV_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8", "fp8": "float8_e4m3fn"}


class AdapterSpec(StrictModel):
    """A PEFT LoRA adapter merged into the weights before quantisation (frontend/adapters.py)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: str  # the adapter directory (adapter_config.json + adapter_model.safetensors)


class PruneOptions(StrictModel):
    """Structured pruning before the graph is built (passes/prune.py), each part chosen from one
    calibration run: FFN channels and query heads by activation importance, whole layers by
    block influence."""

    ffn_channels: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of each layer's FFN channels removed
    heads: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of each KV group's query heads removed
    layers: int = Field(0, ge=0)  # whole layers removed, those that turn the residual stream least
    importance: Literal["activation"] = "activation"  # mean |a_j| x ||W_out[:, j]|| over the calibration set
    calibration: Calibration = Calibration(samples=8, seq_len=256)


class KVCacheOptions(StrictModel):
    """What the KV rows hold and which kernel attends over them. int8 and fp8 rows keep a float32
    scale per token and head; every dtype but fp32 needs kiln's own attention kernel (ONNX Runtime's
    CPU attention reads float32 caches only), which is the default for them."""

    dtype: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = "fp32"
    attention: Literal["onnxruntime", "kiln"] | None = Field(
        None, description="kiln: the engine is cut at attention and kiln's CPU kernel runs it (plugins/paged_attention); "
                          "none: kiln unless dtype is fp32")

    @property
    def kernel(self) -> str:
        return self.attention or ("onnxruntime" if self.dtype == "fp32" else "kiln")

    @property
    def engine_dtype(self) -> str:
        return KV_DTYPES[self.dtype]

    @model_validator(mode="after")
    def _dtype_needs_kernel(self):
        if self.dtype != "fp32" and self.attention == "onnxruntime":
            raise ValueError(f"dtype {self.dtype} needs attention: kiln (ONNX Runtime's CPU attention reads fp32 rows only)")
        return self


class ParallelOptions(StrictModel):
    """tp x pp ranks (rank = stage * tp + tp_rank). stages: explicit [first, end) layer ranges,
    one per pipeline stage; default an even split."""

    tp: int = Field(1, ge=1, le=64, description="tensor-parallel ranks: split heads and the MLP")
    pp: int = Field(1, ge=1, le=64, description="pipeline stages: split the layers")
    stages: list[tuple[int, int]] | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


class QualityLimits(StrictModel):
    """Build-time quality gate of a quantised or pruned engine (weights, KV rows other than fp32, removed channels) against the fp32 engine of the same source."""

    window: int = Field(2048, ge=16, description="evaluation tokens (stdlib text unless text is set)")
    text: str | None = None
    max_ppl_increase_pct: float | None = Field(None, ge=0)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    gate: bool = Field(True, description="false: no evaluation at build time (kiln eval ARTIFACT --reference SOURCE "
                                         "runs it later); for models too large to evaluate where they are built")


class SpeculativeOptions(StrictModel):
    """Speculative decoding that `kiln run`, `kiln serve` and generate() use by default with this
    engine (runtime/speculative.py); their own flags override it."""

    method: Literal["ngram", "draft"] = "ngram"  # prompt lookup, or a draft artifact
    num_speculative: int | None = Field(None, ge=1, le=32, description="tokens proposed a step; none: adaptive")
    max_speculative: int = Field(16, ge=1, le=32)
    draft: str | None = Field(None, description="method draft: a sibling artifact's name, or a path")
    ngram_max: int = Field(3, ge=1, le=16)
    ngram_min: int = Field(1, ge=1, le=16)

    @model_validator(mode="after")
    def _draft_iff_method(self):
        if (self.method == "draft") != bool(self.draft):
            raise ValueError("method draft needs draft: ARTIFACT, and only it takes one")
        if self.ngram_min > self.ngram_max:
            raise ValueError("ngram_min must be <= ngram_max")
        return self


class ServeOptions(StrictModel):
    """Runtime settings `kiln serve` starts with for this engine (recorded in engine.json); its
    flags override them. `kiln tune` writes them into a tuned recipe."""

    max_num_seqs: int | None = Field(None, ge=1, le=4096, description="sequences generated at once")
    max_num_batched_tokens: int | None = Field(None, ge=1, le=65536, description="tokens one engine step feeds")
    prefix_cache_tokens: int | None = Field(None, ge=0, description="KV of shared prompt prefixes kept, in tokens")
    threads: int | None = Field(None, ge=1, le=1024, description="intra-op threads")


class Recipe(StrictModel):
    schema_version: Literal[1] = Field(alias="schema")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    source: str
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    dtype: Literal["float32"] = "float32"  # the IR's; tensorrt.precision sets the engine's
    max_batch: int = Field(4, gt=0, le=256)
    max_seq: int = Field(2048, gt=0, le=131072)
    passes: list[str] = ["merge_qkv", "merge_gate_up", "dedupe_constants", "dce", "shape_inference"]
    onnxruntime: OnnxRuntimeOptions = OnnxRuntimeOptions()
    tensorrt: TensorRTOptions = TensorRTOptions()
    quantization: QuantConfig | None = None
    quality: QualityLimits = QualityLimits()
    parallel: ParallelOptions = ParallelOptions()
    plugins: list[str] = []  # custom-op plugins whose rewrite passes run after `passes` (kiln plugins list)
    kv_cache: KVCacheOptions = KVCacheOptions()
    speculative: SpeculativeOptions | None = None
    serve: ServeOptions | None = None
    adapters: list[AdapterSpec] = []  # merged in order, before quantisation (so AWQ calibrates the merged model)
    prune: PruneOptions | None = None  # structured pruning, after the adapters, before the graph; always gated

    def adapter_list(self) -> list[tuple[str, str]]:
        return [(a.name, a.path) for a in self.adapters]

    @field_validator("adapters")
    @classmethod
    def _unique_adapters(cls, v: list[AdapterSpec]) -> list[AdapterSpec]:
        names = [a.name for a in v]
        if len(set(names)) != len(names):
            raise ValueError("two adapters have the same name")
        return v

    @model_validator(mode="after")
    def _adapters_change_the_weights(self):
        """scheme gguf keeps the file's grids exactly, which a merged adapter would change."""
        if self.adapters and self.quantization is not None and self.quantization.scheme == "gguf":
            raise ValueError("adapters cannot be merged into scheme gguf (it keeps the file's grids as they are); "
                             "use int4-awq or another scheme")
        return self

    @model_validator(mode="before")
    @classmethod
    def _gguf_is_exact(cls, data):
        """scheme gguf keeps the file's grids exactly; its engine computes exactly what the
        dequantised checkpoint computes only with fp32 activations (MatMulNBits level 0), so that
        is its default; level 4 (int8 activations) may be asked for, for speed. (TensorRT takes
        the Q4_0 grids it can hold and refuses the rest in the pass, naming them.)"""
        if not isinstance(data, dict) or not isinstance(data.get("quantization"), dict):
            return data
        if data["quantization"].get("scheme") != "gguf":
            return data
        ort = data.get("onnxruntime") or {}
        if not isinstance(ort, dict) or "int4_accuracy_level" in ort:
            return data
        return {**data, "onnxruntime": {**ort, "int4_accuracy_level": 0}}

    @model_validator(mode="after")
    def _kiln_attention_runs_here(self):
        """kiln's attention kernel runs in the single-rank ONNX Runtime CPU runtime, on fp32 activations."""
        if "paged_attention" in self.plugins:
            raise ValueError("plugin paged_attention is chosen by kv_cache: {attention: kiln}, not by plugins:")
        if self.kv_cache.kernel != "kiln":
            return self
        o, where = self.onnxruntime, f"kv_cache (dtype {self.kv_cache.dtype}, attention kiln)"
        if self.backend != "onnxruntime" or o.device != "cpu" or o.precision != "float32" or self.parallel.world_size > 1:
            raise ValueError(f"{where} runs on backend onnxruntime, device cpu, precision float32, tp = pp = 1 only")
        return self

    @field_validator("passes")
    @classmethod
    def _known_passes(cls, v: list[str]) -> list[str]:
        from compiler.passes import PASSES

        unknown = [p for p in v if p not in PASSES]
        if unknown:
            raise ValueError(f"unknown pass {unknown[0]!r} (known: {', '.join(PASSES)})")
        return v

    def resolved(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise KilnError(f"recipe {path} does not exist", "pass a recipes/*.yaml file")
    return parse_recipe(load_mapping(path, "recipe", "recipes/smollm2-135m.yaml"), str(path))


def parse_recipe(data: dict, where: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        elif err["type"] == "missing":
            reason = "required field is missing"
        raise KilnError(f"{where}: field '{field}': {reason}", f"fix '{field}' (schema version {SCHEMA_VERSION})") from None
    _check_calibration_apart(recipe, where)
    return recipe


def _same_text(calibration_source: str, quality_text: str | None) -> bool:
    """Whether calibration and the quality gate read the same text ('stdlib' and no quality.text
    are both the pydoc topics; two paths, the same file or the same bytes)."""
    if calibration_source == "stdlib" or quality_text is None:
        return calibration_source == "stdlib" and quality_text is None
    a, b = Path(calibration_source).expanduser(), Path(quality_text).expanduser()
    if a.resolve() == b.resolve():
        return True
    try:
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False  # a missing file is refused by name where it is read


def _check_calibration_apart(recipe: Recipe, where: str) -> None:
    """The quality gate scores the first window + 1 tokens of its text; calibration reads its text
    from token EVAL_TOKENS on. On the same text, a longer window would score the engine on the
    data its scales were fitted to: refused before any work."""
    from compiler.passes.quant import needs_calibration
    from compiler.passes.quant.calibration import EVAL_TOKENS

    q = recipe.quality
    if recipe.quantization is None or not needs_calibration(recipe.quantization) or not q.gate or recipe.backend != "onnxruntime":
        return
    if q.window + 1 > EVAL_TOKENS and _same_text(recipe.quantization.calibration.source, q.text):
        raise KilnError(f"{where}: quality.window {q.window} overlaps the calibration text (the gate scores its first "
                        f"{q.window + 1} tokens, calibration reads it from token {EVAL_TOKENS} on)",
                        f"lower quality.window to {EVAL_TOKENS - 1} or less, or give quality.text and "
                        "quantization.calibration.source different texts")
