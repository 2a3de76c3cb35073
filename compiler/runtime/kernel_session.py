"""The Session of an engine cut at kiln's attention: ONNX Runtime parts, kiln's CPU kernel between.

The backend cut `model.onnx` at each `kiln::PagedAttention` (engine.json `steps`); a step runs
the parts in order, and between two parts kiln's compiled attention kernel
(plugins/paged_attention/cpu.py) writes the layer's new keys and values into the KV rows, in
place, and attends over them. The rows are host memory this session allocates and the KV manager
owns, as for `DecoderSession`: [rows, kv_heads, max_seq, head_dim] per layer in the engine's KV
dtype (float32, float16, bfloat16, int8 or fp8), paged by the OS; int8 and fp8 rows keep a float32
scale per token and head beside them ([rows, kv_heads, max_seq, 1]), copied with the rows by
prefix reuse. ONNX Runtime never sees the rows, so any dtype works the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compiler.runtime.config import Capabilities, EngineConfig, InvalidEngineConfig
from compiler.runtime.kv_memory import SCALED, PagedArray, storage
from compiler.runtime.parts import open_parts, run_part
from compiler.runtime.session import greedy_sampling, require_provider, session_options
from compiler.runtime.session_api import SAMPLING_INPUTS, checked, last_column, no_sampling
from plugins.paged_attention import cpu

OUTPUTS = ("logits", "next_tokens")
PLANNED_TOKENS = 64  # calls of at most this many tokens keep a plan (their buffers are small)
MAX_PLANS = 8  # plans a row span keeps, least recently made dropped first


@dataclass
class RowCache:
    """Per layer: keys, values (and their scales), each [rows, kv_heads, max_seq, head_dim or 1]."""

    batch: int
    layers: list[tuple[np.ndarray, ...]]
    _paged: list[PagedArray] = field(default_factory=list)  # the mappings (a whole cache, not a row view)


@dataclass(frozen=True)
class Attend:
    """One kernel step: which layer's rows, the names it reads and writes, its attributes."""

    layer: int
    q: str
    k: str
    v: str
    y: str
    heads: tuple[int, int]
    scale: float
    window: int


class KernelSession:
    """The Session (runtime/session_api.py) of ONNX Runtime CPU parts with kiln's attention kernel."""

    SUPPORTS = Capabilities(sliceable=True, paged=True, samples=True)
    KIND = "ONNX Runtime CPU with kiln's attention kernel"

    def __init__(self, engine_dir: Path, cfg: EngineConfig, threads: int | None = None, config_entries: dict | None = None):
        self.cfg, kv = cfg, cfg.kv_cache
        require_provider(cfg.session.execution_provider)
        if cfg.session.execution_provider != "CPUExecutionProvider" or kv is None:
            raise InvalidEngineConfig("engine.json: a cut engine runs on the CPU provider with a KV cache; rebuild the artifact")
        so = session_options(cfg.session, threads, config_entries)
        self.threads = so.intra_op_num_threads
        self.capabilities = checked(cfg.capabilities, self.SUPPORTS, self.KIND)
        self.storage, self.scaled = storage(kv), kv.dtype in SCALED
        # each part's threads stop spinning when its run ends: the next part's and the kernel's threads need the cores;
        # no memory pattern or arena per part: 31 sessions planning and growing their own for each new call shape
        # cost a prefill of new shapes ~15 % (measured: 4 x 128-token chunks of eight shapes, 2 threads)
        so.add_session_config_entry("session.force_spinning_stop", "1")
        so.enable_mem_pattern, so.enable_cpu_mem_arena = False, False
        self.sessions = open_parts(engine_dir, cfg.steps, so)
        self.kernel = cpu.load(self.threads)
        self.attends = {i: _attend(s, kv) for i, s in enumerate(cfg.steps) if "kernel" in s}
        names = {n for s in cfg.steps if "part" in s for n in s["inputs"]}
        self._sampling_inputs = set(SAMPLING_INPUTS) <= names
        if self._sampling_inputs != self.capabilities.samples:
            raise InvalidEngineConfig(f"engine.json says samples={self.capabilities.samples} but its parts "
                                      f"{'have' if self._sampling_inputs else 'lack'} kiln::Sample's inputs; rebuild the artifact")

    # -- rows ------------------------------------------------------------------------------
    def new_cache(self, batch: int) -> RowCache:
        kv = self.cfg.kv_cache
        shape, scales = (batch, kv.num_kv_heads, kv.max_seq, kv.head_dim), (batch, kv.num_kv_heads, kv.max_seq, 1)
        paged, layers = [], []
        for _ in range(kv.num_layers):
            arrays = [PagedArray(shape, self.storage), PagedArray(shape, self.storage)]
            arrays += [PagedArray(scales, np.float32), PagedArray(scales, np.float32)] if self.scaled else []
            paged += arrays
            layers.append(tuple(a.array for a in arrays))
        return RowCache(batch, layers, paged)

    def cache_rows(self, cache: RowCache, lo: int, hi: int) -> RowCache:
        """Rows [lo, hi), sharing the cache's memory (each row is contiguous)."""
        return RowCache(hi - lo, [tuple(a[lo:hi] for a in layer) for layer in cache.layers])

    def release_row(self, cache: RowCache, row: int) -> None:
        for arr in cache._paged:
            arr.release(row)

    def kv_arrays(self, cache: RowCache) -> list[np.ndarray]:
        """Every layer's keys, values (and scales), in that order: prefix blocks copy all of them."""
        return [a for layer in cache.layers for a in layer]

    def binding(self, cache: RowCache) -> "Binding":
        return Binding(cache, {name: sess.io_binding() for name, sess in self.sessions.items()})

    # -- one engine call -------------------------------------------------------------------
    def step(self, binding: "Binding", input_ids: np.ndarray, position_ids: np.ndarray,
             logits_positions: np.ndarray | None = None, sampling: dict | None = None) -> np.ndarray:
        """As DecoderSession.step: logits [B, K, V] at logits_positions, or next tokens [B] when
        sampling (engines whose graph ends in kiln::Sample). The result is valid until the next step."""
        B, S = input_ids.shape
        if not self._sampling_inputs:
            no_sampling(sampling)
        feeds = {"input_ids": input_ids, "position_ids": position_ids, "logits_positions": last_column(input_ids, logits_positions)}
        if self._sampling_inputs:
            feeds.update(sampling or greedy_sampling(B))
        wanted = "next_tokens" if sampling is not None else "logits"
        key = (B, S, feeds["logits_positions"].shape[1], wanted)
        plan = binding.plans.get(key)
        if plan is not None:  # a shape seen before: every buffer and binding is there, only the inputs change
            for name, value in feeds.items():
                plan[name][...] = value
            self._run(binding, plan, wanted, fixed=True)
            return plan[wanted]
        env = {k: np.ascontiguousarray(v, dtype=SAMPLING_INPUTS.get(k, np.int64)) for k, v in feeds.items()}
        self._run(binding, env, wanted, fixed=False)
        if B * S <= PLANNED_TOKENS:
            binding.plan(key, env, self)
        return env[wanted]

    def _run(self, binding: "Binding", env: dict, wanted: str, fixed: bool) -> None:
        """Every step in order over env; fixed: env is a plan, its parts' IO bound to its buffers."""
        skip = frozenset(OUTPUTS) - {wanted}
        for i, s in enumerate(self.cfg.steps):
            if "part" not in s and fixed:
                binding.prepared[(id(env), i)]()
            elif "part" not in s:
                a = self.attends[i]
                env[a.y] = self.kernel(env[a.q], env[a.k], env[a.v], *_rows(binding.cache.layers[a.layer]),
                                       env["position_ids"], a.heads, self.cfg.kv_cache.dtype, a.window, a.scale)
            elif fixed:
                self.sessions[s["part"]].run_with_iobinding(binding.prepared[(id(env), s["part"])])
            else:
                run_part(self.sessions[s["part"]], binding.ios[s["part"]], s, env, skip=skip)


class Binding:
    """A row span's cache, an IO binding per part for calls of new shapes, and for each small call
    shape seen (decodes, short chunks, speculative verifies) a plan: every value's buffer, and each
    part's IO bound to those buffers once, so a step of that shape allocates and binds nothing."""

    def __init__(self, cache: RowCache, ios: dict[str, ort.IOBinding]):
        self.cache, self.ios = cache, ios
        self.plans: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
        self.prepared: dict[tuple[int, str | int], object] = {}  # (plan, part) -> IO binding; (plan, step) -> kernel call

    def plan(self, key: tuple, env: dict[str, np.ndarray], session: KernelSession) -> None:
        buffers = {name: np.array(value) for name, value in env.items()}  # owned copies: the OrtValues wrap them
        wanted = key[3]
        for i, s in enumerate(session.cfg.steps):
            if "part" not in s:  # the kernel over these buffers and this span's rows, made ready once
                a = session.attends[i]
                self.prepared[(id(buffers), i)] = session.kernel.prepare(
                    buffers[a.q], buffers[a.k], buffers[a.v], *_rows(self.cache.layers[a.layer]), buffers["position_ids"],
                    a.heads, session.cfg.kv_cache.dtype, a.window, a.scale, buffers[a.y])
                continue
            io = session.sessions[s["part"]].io_binding()
            for name in s["inputs"]:
                io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buffers[name]))
            for name in s["outputs"]:
                if name in buffers and (name not in OUTPUTS or name == wanted):
                    io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buffers[name]))
            self.prepared[(id(buffers), s["part"])] = io
        self.plans[key] = buffers
        if len(self.plans) > MAX_PLANS:
            _, old = self.plans.popitem(last=False)
            self.prepared = {k: v for k, v in self.prepared.items() if k[0] != id(old)}


def _rows(layer: tuple[np.ndarray, ...]) -> tuple:
    """keys, values, key scales, value scales (None for rows without scales)."""
    return layer if len(layer) == 4 else (*layer, None, None)


def _attend(s: dict, kv) -> Attend:
    """A kernel step of engine.json, checked: its layer from its cache input (`past_key.{i}`)."""
    if s.get("kernel") != "PagedAttention" or len(s.get("inputs", [])) < 6 or not s.get("outputs"):
        raise InvalidEngineConfig(f"engine.json: step {s.get('kernel')!r} is not a kernel this runtime runs; rebuild the artifact")
    prefix, _, index = s["inputs"][3].rpartition(".")
    if prefix != "past_key" or not index.isdigit() or int(index) >= kv.num_layers:
        raise InvalidEngineConfig(f"engine.json: PagedAttention reads {s['inputs'][3]!r}, not a layer's past_key.{{i}}")
    if s.get("kv_dtype", "float32") != kv.dtype:
        raise InvalidEngineConfig(f"engine.json: PagedAttention rows are {s.get('kv_dtype')} but kv_cache says {kv.dtype}")
    q, k, v = s["inputs"][:3]
    return Attend(int(index), q, k, v, s["outputs"][0], (int(s["num_heads"]), int(s["kv_num_heads"])),
                  float(s.get("scale", 0.0)), int(s.get("window", 0)))
