"""The engine config (`engine.json`): everything the runtime needs to drive an engine.

Written by a backend at build time, read by the runtime at load time. Plain dataclasses and
JSON, so a server needs nothing from the build side to read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENGINE_FORMAT = 1


class InvalidEngineConfig(ValueError):
    """engine.json is malformed or was edited into something the runtime cannot drive."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, int64, ...
    shape: list  # ints, or strings for dynamic axes ("batch", "seq")


@dataclass(frozen=True)
class KVCacheSpec:
    """Static cache per layer: [batch, num_kv_heads, max_seq, head_dim], updated in place."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_seq: int
    dtype: str = "float32"  # float32 | float16 | bfloat16 | int8 | float8_e4m3fn (int8, fp8: with scales)
    layout: str = "batch,kv_heads,max_seq,head_dim"
    key_input: str = "past_key.{i}"
    value_input: str = "past_value.{i}"
    key_output: str = "present_key.{i}"
    value_output: str = "present_value.{i}"


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime session options chosen at build time (0 threads = physical cores at load)."""

    execution_provider: str = "CPUExecutionProvider"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization_level: str = "ORT_ENABLE_ALL"
    config_entries: dict = field(default_factory=dict)  # SessionOptions.add_session_config_entry
    provider_options: dict = field(default_factory=dict)  # the execution provider's options (CUDA: device_id, ...)
    cuda_graph: bool = False  # CUDA: replay the decode step from a captured graph (one per batch size)


@dataclass(frozen=True)
class GenerationDefaults:
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0


@dataclass(frozen=True)
class TensorRTSpec:
    """What a TensorRT engine was built for: checked at load time."""

    flavour: str  # "tensorrt_rtx" | "tensorrt"
    version: str
    precision: str  # "float16" | "bfloat16"
    targets: list[str]  # compute capabilities, e.g. ["SM80", "SM89"]
    profiles: list[dict]  # per profile: {input name: [min, opt, max] shapes}


@dataclass(frozen=True)
class RankSpec:
    """One rank of a multi-rank engine: where it sits and what it runs, in order. Each step is
    {"part": file, "inputs": [...], "outputs": [...]} (an ONNX Runtime session) or
    {"collective": "AllReduce", "input": name, "output": name, "group": "tp", ...}."""

    rank: int
    stage: int
    tp_rank: int
    layers: list[int]  # [first, end)
    model_file: str  # rank{r}.onnx (ONNX Runtime: the uncut rank graph) or rank{r}.engine
    steps: list[dict] = field(default_factory=list)
    weight_bytes: int = 0
    replicated_bytes: int = 0  # of weight_bytes: the same on every tp rank (embeddings, norms, lm_head, experts)


@dataclass(frozen=True)
class ParallelSpec:
    """tp x pp layout; rank r = stage * tp + tp_rank. Hidden states [B, S, hidden_size] move
    between stages (same tp_rank) by send/recv; logits leave the last stage by broadcast."""

    tp: int
    pp: int
    stages: list[list[int]]
    hidden_size: int
    ranks: list[RankSpec]

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class Capabilities:
    """What the engine's session can do, declared by the backend that built it; the engine
    core reads these and nothing else to decide how to drive a session (runtime/session_api.py)."""

    sliceable: bool = True  # a call may bind a span of cache rows; else every row, every call
    paged: bool = True  # host KV rows, paged by the OS: a released row's pages go back, prefix blocks copy in
    logits_at_every_position: bool = True  # logits_positions [B, K] may name any column (speculative verify)
    samples: bool = False  # the graph ends in kiln::Sample: a step returns next tokens, no logits
    multi_token_rows: bool = True  # one call may feed several rows several tokens each over a past


SAMPLING_INPUT_NAMES = ("temperature", "top_k", "top_p", "draws")  # kiln::Sample's per-row inputs (plugins/sample)


def legacy_capabilities(d: dict) -> Capabilities:
    """The capabilities of an engine.json written before they were declared, derived once, here,
    by the rules the ONNX Runtime backend declares them with (backends/onnxruntime/backend.py)."""
    host = d.get("backend") == "onnxruntime" and not d.get("parallel") and \
        d.get("session", {}).get("execution_provider", "CPUExecutionProvider") == "CPUExecutionProvider"
    names = {t["name"] for t in d.get("inputs", [])}
    contrib = "ort-contrib" in str(d.get("graph_flavour", "")).split()
    return Capabilities(sliceable=host, paged=host, samples=set(SAMPLING_INPUT_NAMES) <= names,
                        multi_token_rows=not (host and contrib))


@dataclass(frozen=True)
class EngineConfig:
    backend: str
    model_file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kv_cache: KVCacheSpec | None  # None for encoders
    max_batch: int
    max_seq: int
    vocab_size: int
    session: SessionConfig = SessionConfig()
    generation: GenerationDefaults = GenerationDefaults()
    graph_flavour: str = "standard"  # "standard" ONNX ops, or "ort-contrib" after legalisation
    tensorrt: TensorRTSpec | None = None  # TensorRT engines only
    task: str = "generate"  # "generate" (decoder with KV cache) | "embed" (encoder -> sentence embeddings)
    parallel: ParallelSpec | None = None  # multi-rank engines only (kv_cache then holds one rank's heads)
    speculative: dict | None = None  # the recipe's speculative section: the runtime's default (runtime/speculative.py)
    serve: dict | None = None  # the recipe's serve section: kiln serve's defaults (runtime/settings.py)
    capabilities: Capabilities = Capabilities()  # what the session can do (see Capabilities)
    # an engine cut at kiln's CPU kernels (runtime/kernel_session.py): {"part": file, "inputs", "outputs"}
    # and {"kernel": "PagedAttention", "inputs", "outputs", ...attributes}, in order; [] for a whole graph
    steps: list[dict] = field(default_factory=list)
    format: int = ENGINE_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        """Parsed and checked: anything malformed raises InvalidEngineConfig (a ValueError) naming it."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            if d.get("format") != ENGINE_FORMAT:
                raise InvalidEngineConfig(f"engine format {d.get('format')!r} is not {ENGINE_FORMAT}; rebuild the artifact "
                                          "with this kiln")
            cfg = cls._from_dict(d)
        except InvalidEngineConfig:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidEngineConfig(f"engine.json is not a valid kiln engine config ({type(e).__name__}: {e}); "
                                      "rebuild the artifact or restore its engine.json") from None
        cfg._check()
        return cfg

    @classmethod
    def _from_dict(cls, d: dict) -> "EngineConfig":
        return cls(
            **{
                **d,
                "inputs": [TensorSpec(**t) for t in d["inputs"]],
                "outputs": [TensorSpec(**t) for t in d["outputs"]],
                "kv_cache": KVCacheSpec(**d["kv_cache"]) if d.get("kv_cache") else None,
                "session": SessionConfig(**d["session"]),
                "generation": GenerationDefaults(**d["generation"]),
                "tensorrt": TensorRTSpec(**d["tensorrt"]) if d.get("tensorrt") else None,
                "parallel": _parallel(d.get("parallel")),
                "capabilities": Capabilities(**d["capabilities"]) if "capabilities" in d else legacy_capabilities(d),
            }
        )

    def _check(self) -> None:
        """The values the runtime sizes buffers and opens files with."""
        def bad(why: str) -> InvalidEngineConfig:
            return InvalidEngineConfig(f"engine.json: {why}; rebuild the artifact or restore its engine.json")

        for key in ("max_batch", "max_seq", "vocab_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"{key}={value!r} is not a positive integer")
        if not isinstance(self.model_file, str) or not self.model_file or Path(self.model_file).name != self.model_file:
            raise bad(f"model_file={self.model_file!r} is not a file name inside the artifact")
        ranks = self.parallel.ranks if self.parallel is not None else []
        for step in [*self.steps, *(s for r in ranks for s in r.steps)]:  # part / engine: files the runtime opens
            if not isinstance(step, dict) or not {"part", "kernel", "collective", "engine"} & set(step):
                raise bad(f"step {step!r} is neither a graph part, a kernel, a collective nor an engine")
            for key, suffix in (("part", ".onnx"), ("engine", ".engine")):
                name = step.get(key)
                if key in step and (not isinstance(name, str) or Path(name).name != name or not name.endswith(suffix)):
                    raise bad(f"step {key}={name!r} is not an {suffix} file name inside the artifact")
        kv = self.kv_cache
        if kv is not None:
            dims = (kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.max_seq)
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in dims) or kv.max_seq != self.max_seq:
                raise bad(f"kv_cache {list(dims)} does not describe a cache of max_seq {self.max_seq}")
        if self.session.graph_optimization_level not in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED",
                                                         "ORT_ENABLE_LAYOUT", "ORT_ENABLE_ALL"):
            raise bad(f"session.graph_optimization_level={self.session.graph_optimization_level!r} is unknown")

    @classmethod
    def load(cls, path: Path) -> "EngineConfig":
        try:
            return cls.from_json(Path(path).read_text())
        except InvalidEngineConfig as e:
            raise InvalidEngineConfig(f"{Path(path).parent}: {e}") from None


def _parallel(d: dict | None) -> ParallelSpec | None:
    if not d:
        return None
    return ParallelSpec(**{**d, "ranks": [RankSpec(**r) for r in d["ranks"]]})
