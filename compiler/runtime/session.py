"""ONNX Runtime session for a decoder engine, with the KV cache bound in place.

`KVCache` allocates each layer's [B, Nkv, M, D] key and value buffers once per batch; `bind()`
binds every `past_*` input and its `present_*` output to the same buffer, so TensorScatter (or
the contrib attention kernel) writes new entries in place and nothing is reallocated per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compiler.runtime.config import Capabilities, EngineConfig, InvalidEngineConfig, SessionConfig
from compiler.runtime.kv_memory import PagedArray
from compiler.runtime.session_api import SAMPLING_INPUTS, checked, last_column, no_sampling


def physical_cores() -> int:
    """Physical cores (not hyper-threads) of this machine, from /proc/cpuinfo when readable."""
    try:
        pairs, phys, core = set(), None, None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = val.strip()
            elif key == "core id":
                core = val.strip()
                pairs.add((phys, core))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


@dataclass
class KVCache:
    batch: int
    keys: list[ort.OrtValue]
    values: list[ort.OrtValue]
    _arrays: list[np.ndarray]  # owners of the buffers the OrtValues wrap
    _paged: list[PagedArray] = field(default_factory=list)  # their mappings (a full cache; not a row view)

    def release_row(self, row: int) -> None:
        """Hand a finished sequence's KV pages back to the OS (see runtime/kv_memory.py)."""
        for arr in self._paged:
            arr.release(row)


class ProviderUnavailable(ValueError):
    """The engine was built for an execution provider this onnxruntime lacks (never a silent
    fall back to the CPU)."""


def require_provider(name: str) -> None:
    available = ort.get_available_providers()
    if name not in available:
        package = {"CUDAExecutionProvider": "onnxruntime-gpu (pip install 'kiln[cuda]') and an NVIDIA GPU"}.get(name, name)
        raise ProviderUnavailable(f"this engine runs on {name}, which needs {package}; this onnxruntime has "
                                  f"{', '.join(available)}")


def session_options(cfg: SessionConfig, threads: int | None = None, config_entries: dict | None = None,
                    cores: int | None = None) -> ort.SessionOptions:
    """ONNX Runtime session options for cfg (an engine's `session`, or the build's own); intra-op
    threads: the caller's, else cfg's, else the cores this process may use (default: the machine's
    physical cores). config_entries are added after cfg's, overriding them."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or cfg.intra_op_threads or cores or physical_cores()
    so.inter_op_num_threads = cfg.inter_op_threads
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg.graph_optimization_level)
    so.log_severity_level = 3
    for key, value in {**cfg.config_entries, **(config_entries or {})}.items():
        so.add_session_config_entry(key, value)
    return so


class DecoderSession:
    """The Session (runtime/session_api.py) of ONNX Runtime on the CPU: host KV rows, paged."""

    SUPPORTS = Capabilities(sliceable=True, paged=True, samples=True)
    KIND = "ONNX Runtime CPU"

    def __init__(self, engine_dir: Path, cfg: EngineConfig, threads: int | None = None, config_entries: dict | None = None):
        self.cfg = cfg
        so = session_options(cfg.session, threads, config_entries)
        require_provider(cfg.session.execution_provider)
        self.threads = so.intra_op_num_threads
        provider = (cfg.session.execution_provider, dict(cfg.session.provider_options))
        self.session = ort.InferenceSession(str(engine_dir / cfg.model_file), so, providers=[provider])
        self.capabilities = checked(cfg.capabilities, self.SUPPORTS, self.KIND)
        names = {i.name for i in self.session.get_inputs()}
        self._sampling_inputs = set(SAMPLING_INPUTS) <= names  # the graph ends in kiln::Sample (plugins/sample)
        if self._sampling_inputs != self.capabilities.samples:
            raise InvalidEngineConfig(f"engine.json says samples={self.capabilities.samples} but {cfg.model_file} "
                                      f"{'has' if self._sampling_inputs else 'lacks'} kiln::Sample's inputs; rebuild the artifact")

    def new_cache(self, batch: int) -> KVCache:
        kv = self.cfg.kv_cache
        shape = (batch, kv.num_kv_heads, kv.max_seq, kv.head_dim)
        paged = [PagedArray(shape, kv.dtype) for _ in range(2 * kv.num_layers)]  # committed as written
        arrays = [p.array for p in paged]
        vals = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        return KVCache(batch, vals[0::2], vals[1::2], arrays, paged)

    def cache_rows(self, cache: KVCache, lo: int, hi: int) -> KVCache:
        """Rows [lo, hi) of a cache, sharing its memory (each row is contiguous in [B, H, M, D])."""
        views = [a[lo:hi] for a in cache._arrays]
        vals = [ort.OrtValue.ortvalue_from_numpy(v) for v in views]
        return KVCache(hi - lo, vals[0::2], vals[1::2], views)

    def release_row(self, cache: KVCache, row: int) -> None:
        cache.release_row(row)

    def kv_arrays(self, cache: KVCache) -> list[np.ndarray]:
        """The host arrays of every layer, keys and values interleaved: [rows, kv_heads, max_seq, head_dim]."""
        return cache._arrays

    def binding(self, cache: KVCache) -> "Binding":
        kv, io = self.cfg.kv_cache, self.session.io_binding()
        caches = []
        for i in range(kv.num_layers):
            for pattern_in, pattern_out, buf in ((kv.key_input, kv.key_output, cache.keys[i]),
                                                 (kv.value_input, kv.value_output, cache.values[i])):
                io.bind_ortvalue_input(pattern_in.format(i=i), buf)
                io.bind_ortvalue_output(pattern_out.format(i=i), buf)
                caches.append((pattern_out.format(i=i), buf))
        return Binding(io, caches)

    def step(self, binding: "Binding", input_ids: np.ndarray, position_ids: np.ndarray,
             logits_positions: np.ndarray | None = None, sampling: dict | None = None) -> np.ndarray:
        """Run input_ids/position_ids [B, S] int64 through the engine; returns logits [B, K, V]
        at logits_positions [B, K] (indices into S; default: the last column). The returned
        array is the bound output buffer: valid until the next step.
        sampling (engines that sample, see `samples`): temperature, top_k, top_p, draws [B];
        the step then returns next_tokens [B] int64 and no logits leave the engine."""
        B = input_ids.shape[0]
        logits_positions = last_column(input_ids, logits_positions)
        if not self._sampling_inputs:
            no_sampling(sampling)
        binding.set_input("input_ids", input_ids)
        binding.set_input("position_ids", position_ids)
        binding.set_input("logits_positions", logits_positions)
        if self._sampling_inputs:
            for name, value in (sampling or greedy_sampling(B)).items():
                binding.set_input(name, value, SAMPLING_INPUTS[name])
        out = binding.tokens_buffer(B) if sampling is not None else binding.logits_buffer(
            (B, logits_positions.shape[1], self.cfg.vocab_size))
        self.session.run_with_iobinding(binding.io)
        return out


def greedy_sampling(batch: int) -> dict:
    """Sampling inputs that make kiln::Sample greedy (fed when only logits are wanted)."""
    return {"temperature": np.zeros(batch, np.float32), "top_k": np.zeros(batch, np.int64),
            "top_p": np.ones(batch, np.float32), "draws": np.zeros(batch, np.float32)}


class Binding:
    """An IO binding with the caches bound in place and a reusable output buffer per shape: the
    logits, or the next tokens of an engine that samples."""

    def __init__(self, io: ort.IOBinding, caches: list | None = None):
        self.io = io
        self.caches = caches or []  # (present output name, buffer): rebound if the outputs are cleared
        self._out: tuple[str, tuple[int, ...]] | None = None
        self._buffer: np.ndarray | None = None
        self._inputs: dict[str, np.ndarray] = {}

    def set_input(self, name: str, value: np.ndarray, dtype=np.int64) -> None:
        """An input: rebound when its shape changes, else written into the bound buffer."""
        buf = self._inputs.get(name)
        if buf is None or buf.shape != value.shape:
            buf = self._inputs[name] = np.array(value, dtype=dtype)  # owned: the OrtValue wraps it
            self.io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf))
        else:
            buf[...] = value

    def logits_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._output("logits", shape, np.float32)

    def tokens_buffer(self, batch: int) -> np.ndarray:
        return self._output("next_tokens", (batch,), np.int64)

    def _output(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        if (name, shape) != self._out:  # decode steps keep one shape: bound once, written in place
            if self._out is not None and self._out[0] != name:  # switching outputs: drop the other binding
                self.io.clear_binding_outputs()
                self._rebind_caches()
            self._buffer = np.empty(shape, dtype=dtype)
            self.io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(self._buffer))
            self._out = (name, shape)
        return self._buffer

    def _rebind_caches(self) -> None:
        for name, buf in self.caches:
            self.io.bind_ortvalue_output(name, buf)
