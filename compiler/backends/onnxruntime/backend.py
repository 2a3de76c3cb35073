"""ONNX Runtime backend: writes `model.onnx` + external weights and the engine config.

Weights are streamed to `model.onnx.data` one tensor at a time (each lazy checkpoint read
happens here), with a progress bar. The standard-op graph is what the parity tests verify;
`legalise` (see legalise.py) may swap in ONNX Runtime's contrib kernels where measured faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from compiler.ir.builder import initializer_bytes
from compiler.runtime.config import EngineConfig, GenerationDefaults, KVCacheSpec, SessionConfig, TensorSpec

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

_NP_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16", ir.DataType.INT64: "int64",
             ir.DataType.INT32: "int32", ir.DataType.BOOL: "bool"}


@dataclass(frozen=True)
class ModelFacts:
    """What the backend needs to know about the model beyond the graph."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    generation: GenerationDefaults
    task: str = "generate"  # "embed": an encoder, no KV cache


def _spec(v: ir.Value) -> TensorSpec:
    dims = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
    return TensorSpec(v.name, _NP_NAMES.get(v.dtype, str(v.dtype)), dims)


def emit(model: ir.Model, facts: ModelFacts, out_dir: Path, *, max_batch: int, max_seq: int,
         session: SessionConfig, graph_flavour: str, progress: bool = True) -> EngineConfig:
    """Serialise `model` into out_dir and return its engine config (also written as engine.json)."""
    save(model, out_dir / MODEL_FILE, DATA_FILE, progress)
    cfg = EngineConfig(
        backend="onnxruntime",
        model_file=MODEL_FILE,
        inputs=[_spec(v) for v in model.graph.inputs],
        outputs=[_spec(v) for v in model.graph.outputs],
        kv_cache=KVCacheSpec(facts.num_layers, facts.num_kv_heads, facts.head_dim, max_seq, dtype=_kv_dtype(model))
        if facts.task == "generate" else None,
        max_batch=max_batch,
        max_seq=max_seq,
        vocab_size=facts.vocab_size,
        session=session,
        generation=facts.generation,
        graph_flavour=graph_flavour,
        task=facts.task,
    )
    (out_dir / "engine.json").write_text(cfg.to_json())
    return cfg


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
