"""TensorRT backend: IR -> network (network.py and the op tables) -> serialised engine.

Writes `rank0.engine` and `build.log` (the builder's log; VERBOSE with DETAILED layer info when
the recipe asks); a tensor-parallel build writes `rank{r}.engine` and `rank{r}.build.log` per
rank, its all-reduces lowered to IDistCollectiveLayers (run on the NCCL communicator handed to
the execution context). With `tensorrt` the timing cache is loaded before and saved after each
build (TensorRT-RTX has none: it does not time kernels at build time).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx_ir as ir

from compiler.backends.base import ModelFacts, RankOutput, RankTarget
from compiler.backends.tensorrt import attention, collectives, ops, quant, trt_module
from compiler.backends.tensorrt.network import Lowering, LoweringError
from compiler.backends.tensorrt.options import TensorRTOptions
from compiler.errors import KilnError
from compiler.memory import return_freed_memory
from compiler.runtime.config import Capabilities, EngineConfig, KVCacheSpec, ParallelSpec, TensorRTSpec, TensorSpec

ENGINE_FILE = "rank0.engine"
LOG_FILE = "build.log"
OPS = {**ops.OPS, **attention.OPS, **quant.OPS, **collectives.OPS}
_INT_INPUTS = ("input_ids", "position_ids", "logits_positions")  # int64 in the IR, int32 bindings


# quantised dtypes the listed GPUs lack ("HW-specific datatypes" to the builder)
_DTYPE_TARGETS = {"fp8": ("SM89", "SM120", "SM121"), "int4": ("SM80", "SM86", "SM89", "SM120", "SM121")}


def check_recipe(quant, cfg, targets: list[str]) -> None:
    """What can be refused from the recipe and the model config alone, before calibration."""
    kind = None if quant is None else ("int4" if quant.scheme.startswith("int4") or quant.scheme == "gguf" else quant.scheme)
    bad = [t for t in targets if kind in _DTYPE_TARGETS and t not in _DTYPE_TARGETS[kind]]
    if bad:
        raise KilnError(f"TensorRT backend: {kind} weights cannot be compiled for {', '.join(bad)} (the GPU lacks the datatype)",
                        f"set tensorrt.targets to a subset of {list(_DTYPE_TARGETS[kind])}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise KilnError(f"TensorRT backend: query heads ({cfg.num_heads}) must be a multiple of KV heads "
                        f"({cfg.num_kv_heads}) for TensorRT's GQA", "use backend: onnxruntime for this model")
    if quant is None or not quant.scheme.startswith("int4"):
        return
    if not quant.symmetric:
        raise KilnError("TensorRT backend: int4 with a zero point (symmetric: false) is refused; TensorRT takes signed int4 only",
                        "set quantization.symmetric: true")
    for k in sorted({cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim}):
        if k % quant.group_size:
            ok = [g for g in (32, 64, 128) if all(x % g == 0 for x in (cfg.hidden_size, cfg.intermediate_size))]
            raise KilnError(f"TensorRT backend: group_size {quant.group_size} does not divide K={k}; TensorRT needs whole blocks",
                            f"set quantization.group_size to one of {ok}")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, recipe, facts: ModelFacts, num_heads: int, progress: bool = True):
        self.recipe, self.facts, self.num_heads, self.progress = recipe, facts, num_heads, progress

    @property
    def flavour(self) -> str:
        p = self.recipe.parallel
        base = f"tensorrt-network {self.recipe.tensorrt.precision}"
        return f"{base} tp={p.tp}" if p.world_size > 1 else base

    def check(self, model: ir.Model) -> None:
        check(model, self.facts, self.num_heads)

    def emit_rank(self, model: ir.Model, target: RankTarget, out: Path) -> RankOutput:
        r = self.recipe
        files = (ENGINE_FILE, LOG_FILE) if target.single else (f"rank{target.rank}.engine", f"rank{target.rank}.build.log")
        collectives = sum(1 for n in model.graph if n.domain == "kiln")
        engine = emit(model, self.facts, self.num_heads, out, r.tensorrt, max_batch=r.max_batch, max_seq=r.max_seq,
                      progress=self.progress, engine_file=files[0], log_file=files[1])
        steps = [] if target.single else [{"engine": files[0], "collectives": collectives}]
        return RankOutput(files[0], engine, steps)

    def engine(self, ranks: list[RankOutput], parallel: ParallelSpec | None) -> EngineConfig:
        first = ranks[0].engine
        return first if parallel is None else dataclasses.replace(first, model_file=ranks[0].model_file, parallel=parallel)

    def record(self, engine: EngineConfig) -> dict:
        t = engine.tensorrt
        return {"name": t.flavour, "version": t.version, "graph": self.flavour, "precision": t.precision,
                "targets": t.targets, "profiles": t.profiles}


def check(model: ir.Model, facts: ModelFacts, num_heads: int) -> None:
    """Rules TensorRT imposes, checked before any build work (one line each, with the fix)."""
    why = attention.check(model.graph, num_heads, facts.num_kv_heads, facts.head_dim)
    if why:
        raise KilnError(f"TensorRT backend: {why}", "use backend: onnxruntime for this model")
    for node in model.graph:
        if node.op_type not in OPS and node.op_type not in ("LessOrEqual", "Slice", "Greater", "And"):
            raise LoweringError(node, f"no lowering for {node.op_type}",
                                "use backend: onnxruntime, or add a lowering in compiler/backends/tensorrt/ops.py")


def emit(model: ir.Model, facts: ModelFacts, num_heads: int, out_dir: Path, opts: TensorRTOptions, *,
         max_batch: int, max_seq: int, progress: bool = True, engine_file: str = ENGINE_FILE,
         log_file: str = LOG_FILE) -> EngineConfig:
    """Build and write `engine_file` (and its build log); returns the engine config."""
    flavour = trt_module.load(opts.module)
    check(model, facts, num_heads)
    trt = flavour.trt
    log = _Log(trt, opts.verbose_log)
    builder = trt.Builder(log)
    lw = Lowering(flavour, opts.precision, builder.create_network(trt_module.network_flags(flavour)))
    kv_shape = (-1, facts.num_kv_heads, max_seq, facts.head_dim)
    specs_in = _add_inputs(lw, model.graph, kv_shape)
    _lower(lw, model.graph, progress)
    specs_out = _mark_outputs(lw, model.graph)
    _release_weights(model.graph)
    config = builder.create_builder_config()
    config.builder_optimization_level = opts.opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED if opts.verbose_log else trt.ProfilingVerbosity.LAYER_NAMES_ONLY
    trt_module.set_targets(flavour, config, opts.targets)
    profiles = _profiles(builder, config, lw, opts, max_batch, max_seq, kv_shape)
    use_cache = opts.timing_cache and trt_module.has_timing_cache(flavour)
    cache_path = Path(os.path.expanduser(opts.timing_cache)) if use_cache else None
    cache = _load_timing_cache(config, cache_path)
    plan = builder.build_serialized_network(lw.net, config)
    del lw, builder  # the network and its weights: only the plan is needed now
    return_freed_memory()
    (out_dir / log_file).write_text("\n".join(log.lines) + "\n")
    if plan is None:
        raise KilnError(f"TensorRT could not build the engine: {log.last_error() or 'no error was logged'}",
                        "check the recipe's targets, precision and quantisation against that message; "
                        "`kiln build --verbose` shows the builder's full log")
    with open(out_dir / engine_file, "wb") as f:
        f.write(memoryview(plan))
    _save_timing_cache(config, cache, cache_path)
    cfg = EngineConfig(
        backend="tensorrt", model_file=engine_file, inputs=specs_in, outputs=specs_out,
        kv_cache=KVCacheSpec(facts.num_layers, facts.num_kv_heads, facts.head_dim, max_seq, dtype=opts.precision),
        max_batch=max_batch, max_seq=max_seq, vocab_size=facts.vocab_size, generation=facts.generation,
        graph_flavour="tensorrt-network", capabilities=Capabilities(sliceable=False, paged=False),
        tensorrt=TensorRTSpec(flavour.name, flavour.version, opts.precision, list(opts.targets), profiles),
    )
    return cfg


def _add_inputs(lw: Lowering, graph: ir.Graph, kv_shape: tuple) -> list[TensorSpec]:
    specs = []
    for v in graph.inputs:
        if v.name in _INT_INPUTS:
            dims, dtype, np_name = tuple(-1 for _ in v.shape), lw.trt.int32, "int32"
        elif v.name.startswith(("past_key.", "past_value.")):
            dims, dtype, np_name = kv_shape, lw.trt_dtype, lw.dtype
        else:
            raise KilnError(f"TensorRT backend: unexpected graph input {v.name}", "rebuild with the kiln frontend")
        lw.inputs[v.name] = lw.net.add_input(v.name, dtype, dims)
        specs.append(TensorSpec(v.name, np_name, [d if isinstance(d, int) else str(d) for d in v.shape]))
    return specs


def _needed(graph: ir.Graph) -> set:
    """Nodes the graph outputs depend on (the ORT-only mask subgraph is left out)."""
    seen, todo = set(), [v.producer() for v in graph.outputs]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.op_type == "Attention":  # the mask input is replaced by per-sequence lengths
            inputs = node.inputs[:3]
        elif node.op_type == "TensorScatter":  # the write index comes from position_ids
            inputs = node.inputs[:2]
        else:
            inputs = node.inputs
        todo.extend(i.producer() for i in inputs if i is not None)
    return seen


def _lower(lw: Lowering, graph: ir.Graph, progress: bool) -> None:
    from rich.progress import Progress

    needed = _needed(graph)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("lowering to TensorRT", total=len(needed))
        for node in graph:
            if node not in needed:
                continue
            outs = OPS[node.op_type](lw, node)
            for v, t in zip(node.outputs, outs):
                lw.values[v] = t
            bar.advance(task)


def _release_weights(graph: ir.Graph) -> None:
    """The network holds its own (converted) copies now: drop the IR's so the build's peak memory
    holds one copy of the weights. The model must not be used for anything but its structure after."""
    for v in graph.initializers.values():
        v.const_value = None
    return_freed_memory()


def _mark_outputs(lw: Lowering, graph: ir.Graph) -> list[TensorSpec]:
    specs = []
    for v in graph.outputs:
        t = lw.values[v]
        if v.name == "logits":
            t, np_name = lw.cast(t, lw.trt.float32), "float32"
        else:
            np_name = lw.dtype
        t.name = v.name
        lw.net.mark_output(t)
        specs.append(TensorSpec(v.name, np_name, [d if isinstance(d, int) else str(d) for d in v.shape]))
    return specs


def _profiles(builder, config, lw: Lowering, opts: TensorRTOptions, max_batch: int, max_seq: int, kv_shape) -> list[dict]:
    """One optimisation profile per recipe entry; returns them as recorded in engine.json."""
    out = []
    for p in opts.profiles:
        b = p.batch or (1, 1, max_batch)
        s = p.input_len or (1, min(128, max_seq), max_seq)
        if b[2] > max_batch or s[2] > max_seq:
            raise KilnError(f"profile batch {list(b)}, input_len {list(s)} exceeds max_batch {max_batch} / max_seq {max_seq}",
                            "lower the profile's max or raise the recipe's limits")
        logits = (1, 1, s[2])  # rows of logits asked for: 1 when decoding, up to every input token
        prof = builder.create_optimization_profile()
        for name in lw.inputs:
            if name.startswith(("past_key.", "past_value.")):
                dims = [(b[i], *kv_shape[1:]) for i in range(3)]
            else:
                dims = [(b[i], (logits if name == "logits_positions" else s)[i]) for i in range(3)]
            prof.set_shape(name, *dims)
        config.add_optimization_profile(prof)
        out.append({"batch": list(b), "input_len": list(s), "logits": list(logits), "kv_len": max_seq})
    return out


def _load_timing_cache(config, path: Path | None):
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=True)
    return cache


def _save_timing_cache(config, cache, path: Path | None) -> None:
    if cache is None or path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    tmp.replace(path)


class _Log:
    """Collects the builder's messages (VERBOSE only when asked) for build.log."""

    def __new__(cls, trt, verbose: bool):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.lines: list[str] = []
                self.floor = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.INFO

            def log(self, severity, msg):
                if int(severity) <= int(self.floor):
                    self.lines.append(f"[{severity.name}] {msg}")

            def last_error(self) -> str | None:
                errors = [line for line in self.lines if line.startswith(("[ERROR]", "[INTERNAL_ERROR]")) and "cudaError 35" not in line]
                return errors[-1] if errors else None

        return Logger()
