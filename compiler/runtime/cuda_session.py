"""ONNX Runtime on CUDA: the decoder session with everything on the device.

The KV cache, the logits and the int64 inputs live in device memory (OrtValues on "cuda"),
bound once per batch through IO binding; each step copies only the new token ids in and the
logits of the sampled rows out. The decode step (fixed batch, one token) is captured in a CUDA
graph on first use and replayed after (`gpu_graph_id` = batch size; prefill runs uncaptured
with id -1), which needs every bound buffer to keep its address: inputs are updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compiler.runtime.config import Capabilities, EngineConfig
from compiler.runtime.session import DecoderSession, KVCache
from compiler.runtime.session_api import last_column, no_sampling, whole_cache

_DTYPES = {"float32": np.float32, "float16": np.float16}


class CudaDecoderSession(DecoderSession):
    """The Session of ONNX Runtime on CUDA: device rows, every row bound each call."""

    SUPPORTS = Capabilities(sliceable=False, paged=False)
    KIND = "ONNX Runtime CUDA"

    def __init__(self, engine_dir: Path, cfg: EngineConfig, config_entries: dict | None = None):
        super().__init__(engine_dir, cfg, 1, config_entries)
        self.device_id = int(cfg.session.provider_options.get("device_id", 0))
        if cfg.kv_cache.dtype not in _DTYPES:
            raise ValueError(f"KV cache dtype {cfg.kv_cache.dtype} has no numpy type for IO binding; build float16")

    def cache_rows(self, cache: KVCache, lo: int, hi: int) -> KVCache:
        return whole_cache(cache, lo, hi)  # device buffers: a step binds every row (see runtime/rows.py)

    def release_row(self, cache: KVCache, row: int) -> None:
        """Device rows are allocated whole: nothing goes back."""

    def kv_arrays(self, cache: KVCache) -> list[np.ndarray]:
        raise ValueError("a CUDA engine's KV cache is device memory: no host arrays")

    def _device(self, shape, dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(tuple(shape), dtype, "cuda", self.device_id)

    def new_cache(self, batch: int) -> KVCache:
        kv = self.cfg.kv_cache
        shape = (batch, kv.num_kv_heads, kv.max_seq, kv.head_dim)
        zeros = np.zeros(shape, dtype=_DTYPES[kv.dtype])
        vals = []
        for _ in range(2 * kv.num_layers):
            v = self._device(shape, zeros.dtype)
            v.update_inplace(zeros)
            vals.append(v)
        return KVCache(batch, vals[0::2], vals[1::2], [])

    def binding(self, cache: KVCache) -> "CudaBinding":
        io = super().binding(cache).io
        return CudaBinding(self, io, cache.batch)

    def step(self, binding: "CudaBinding", input_ids: np.ndarray, position_ids: np.ndarray,
             logits_positions: np.ndarray | None = None, sampling: dict | None = None) -> np.ndarray:
        no_sampling(sampling)
        B, S = input_ids.shape
        logits_positions = last_column(input_ids, logits_positions)
        for name, value in (("input_ids", input_ids), ("position_ids", position_ids), ("logits_positions", logits_positions)):
            binding.set_input(name, value)
        logits = binding.logits((B, logits_positions.shape[1], self.cfg.vocab_size))
        run = ort.RunOptions()
        decode = S == 1 and logits_positions.shape[1] == 1
        # one captured graph per batch size for decode; prefill shapes vary, so never captured
        run.add_run_config_entry("gpu_graph_id", str(B if decode and self.cfg.session.cuda_graph else -1))
        self.session.run_with_iobinding(binding.io, run)
        return logits.numpy()


@dataclass
class CudaBinding:
    session: CudaDecoderSession
    io: ort.IOBinding
    batch: int

    def __post_init__(self):
        self._vals: dict[str, ort.OrtValue] = {}

    def set_input(self, name: str, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, dtype=np.int64)
        v = self._vals.get(name)
        if v is None or tuple(v.shape()) != value.shape:
            v = self._vals[name] = self.session._device(value.shape, np.int64)
            self.io.bind_ortvalue_input(name, v)
        v.update_inplace(value)  # same device address: a captured graph stays valid

    def logits(self, shape: tuple[int, ...]) -> ort.OrtValue:
        v = self._vals.get("logits")
        if v is None or tuple(v.shape()) != shape:
            v = self._vals["logits"] = self.session._device(shape, np.float32)
            self.io.bind_ortvalue_output("logits", v)
        return v
