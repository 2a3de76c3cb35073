"""ONNX Runtime backend: writes `model.onnx` + external weights (or one `rank{r}.onnx` per rank
with its pieces between collectives) and the engine config.

Weights are streamed to the data file one tensor at a time (each lazy checkpoint read happens
here), with a progress bar. Precision (to_float16) and the contrib legalisation are pipeline
passes (compiler/build/pipeline.py) that run before this; the session settings the runtime will use
(threads, MatMulNBits accuracy level, the CUDA provider's options) are chosen here.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from compiler.backends.base import ModelFacts, RankOutput, RankTarget
from compiler.backends.onnxruntime.partition import DOMAIN, KERNELS, write_parts
from compiler.ir.builder import initializer_bytes
from compiler.runtime.config import SAMPLING_INPUT_NAMES, Capabilities, EngineConfig, KVCacheSpec, ParallelSpec, SessionConfig, TensorSpec

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

_NP_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16", ir.DataType.INT64: "int64",
             ir.DataType.INT32: "int32", ir.DataType.BOOL: "bool", ir.DataType.INT8: "int8", ir.DataType.UINT8: "uint8"}


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, recipe, facts: ModelFacts, num_heads: int = 0, progress: bool = True):
        self.recipe, self.facts, self.progress = recipe, facts, progress  # num_heads: the graph says it

    @property
    def graph_flavour(self) -> str:
        """What the graph became: standard, float16, ort-contrib, ort-contrib float16, ..."""
        o = self.recipe.onnxruntime
        half = "" if o.precision == "float32" else o.precision
        kv = self.recipe.kv_cache
        kernel = f"kiln-attention {kv.engine_dtype}" if kv.kernel == "kiln" else ""
        return " ".join(filter(None, ["ort-contrib" if o.graph == "contrib" else "", half, kernel])) or "standard"

    @property
    def flavour(self) -> str:
        p = self.recipe.parallel
        return f"{self.graph_flavour} tp={p.tp} pp={p.pp}" if p.world_size > 1 else self.graph_flavour

    def check(self, model: ir.Model) -> None:
        """ONNX Runtime runs any standard or contrib graph kiln emits: nothing to refuse."""

    def emit_rank(self, model: ir.Model, target: RankTarget, out: Path) -> RankOutput:
        if target.single:
            save(model, out / MODEL_FILE, DATA_FILE, self.progress)
            cut = any(n.domain == DOMAIN and n.op_type in KERNELS for n in model.graph)
            steps = write_parts(out / MODEL_FILE, "model") if cut else []  # kiln's kernels run between the parts
            return RankOutput(MODEL_FILE, self._engine_of(model, steps))
        name = f"rank{target.rank}.onnx"
        save(model, out / name, f"{name}.data", self.progress)
        del model
        return RankOutput(name, None, write_parts(out / name, f"rank{target.rank}"))

    def engine(self, ranks: list[RankOutput], parallel: ParallelSpec | None) -> EngineConfig:
        if parallel is None:
            return ranks[0].engine
        f, r = self.facts, self.recipe
        return EngineConfig(
            backend="onnxruntime", model_file=ranks[0].model_file,
            inputs=[TensorSpec("input_ids", "int64", ["batch", "seq"]), TensorSpec("position_ids", "int64", ["batch", "seq"]),
                    TensorSpec("logits_positions", "int64", ["batch", "logits"])],
            outputs=[TensorSpec("logits", "float32", ["batch", "logits", f.vocab_size])],
            kv_cache=KVCacheSpec(f.num_layers, f.num_kv_heads, f.head_dim, r.max_seq),
            max_batch=r.max_batch, max_seq=r.max_seq, vocab_size=f.vocab_size, session=self.session(),
            generation=f.generation, graph_flavour=self.graph_flavour, parallel=parallel,
            capabilities=Capabilities(sliceable=False, paged=False, multi_token_rows=self.recipe.onnxruntime.graph != "contrib"))

    def record(self, engine: EngineConfig) -> dict:
        import onnxruntime

        return {"name": "onnxruntime", "version": onnxruntime.__version__, "graph": self.flavour}

    def session(self) -> SessionConfig:
        """The settings the runtime opens the session with (recorded in engine.json)."""
        o, q = self.recipe.onnxruntime, self.recipe.quantization
        entries = {"session.qdq_matmulnbits_accuracy_level": str(o.int4_accuracy_level)}
        if q is not None and q.scheme == "fp8":
            # ORT 1.31 fuses Q/DQ + MatMul into MatMulIntegerToFloat, which rejects float8: keep QDQ as is
            entries["session.disable_quant_qdq"] = "1"
        if o.device == "cuda":
            return cuda_session_config(o, entries)
        return SessionConfig(intra_op_threads=o.intra_op_threads, config_entries=entries)

    def _engine_of(self, model: ir.Model, steps: list[dict]) -> EngineConfig:
        f, r = self.facts, self.recipe
        kv_dtype = r.kv_cache.engine_dtype if steps else _kv_dtype(model)
        return EngineConfig(
            backend="onnxruntime", model_file=MODEL_FILE,
            inputs=[_spec(v) for v in model.graph.inputs], outputs=[_spec(v) for v in model.graph.outputs],
            kv_cache=KVCacheSpec(f.num_layers, f.num_kv_heads, f.head_dim, r.max_seq, dtype=kv_dtype)
            if f.task == "generate" else None,
            max_batch=r.max_batch, max_seq=r.max_seq, vocab_size=f.vocab_size, session=self.session(),
            generation=f.generation, graph_flavour=self.flavour, task=f.task, capabilities=self.capabilities(model, bool(steps)),
            steps=steps)

    def capabilities(self, model: ir.Model, kiln_attention: bool = False) -> Capabilities:
        """What the runtime's session can do with this graph: host rows on the CPU provider (a
        span bound per call, paged, prefix blocks copied in), device rows on CUDA (every row bound);
        in-graph sampling when the graph ends in kiln::Sample; several rows of several tokens over
        a past except with ONNX Runtime's GroupQueryAttention on CPU ("batch_size must be 1"),
        which an engine cut at kiln's attention does not use."""
        host = self.recipe.onnxruntime.device != "cuda"
        samples = set(SAMPLING_INPUT_NAMES) <= {v.name for v in model.graph.inputs}
        gqa = host and self.recipe.onnxruntime.graph == "contrib" and not kiln_attention
        return Capabilities(sliceable=host, paged=host, samples=samples, multi_token_rows=not gqa)


def cuda_session_config(o, entries: dict) -> SessionConfig:
    """CUDA EP options chosen by kiln: no cuDNN algorithm search (no convolutions here), an arena
    that grows by what is asked (the KV cache is allocated once), copies on the compute stream,
    and CUDA graphs enabled for the decode step (the runtime picks a graph id per batch size)."""
    options = {"device_id": str(o.device_id), "arena_extend_strategy": "kSameAsRequested",
               "cudnn_conv_algo_search": "DEFAULT", "do_copy_in_default_stream": "1",
               "enable_cuda_graph": "1" if o.cuda_graph else "0"}
    return SessionConfig(execution_provider="CUDAExecutionProvider", intra_op_threads=1, config_entries=entries,
                         provider_options=options, cuda_graph=o.cuda_graph)


def _spec(v: ir.Value) -> TensorSpec:
    dims = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
    return TensorSpec(v.name, _NP_NAMES.get(v.dtype, str(v.dtype)), dims)


def _kv_dtype(model: ir.Model) -> str:
    past = next((v for v in model.graph.inputs if v.name.startswith("past_key.")), None)
    return _NP_NAMES.get(past.dtype, "float32") if past is not None else "float32"


def save(model: ir.Model, path: Path, data_file: str, progress: bool) -> None:
    """Write the graph to path and its weights to data_file beside it, one tensor at a time."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    lazy_bytes = initializer_bytes(model.graph)
    columns = (TextColumn("writing weights"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("weights", total=lazy_bytes)

        def tick(tensor, _info) -> None:
            bar.advance(task, tensor.nbytes)

        # one tensor in flight at a time keeps peak memory near the largest weight
        ir.save(model, path, external_data=data_file, callback=tick, max_workers=1, max_in_flight_bytes=64 << 20)
