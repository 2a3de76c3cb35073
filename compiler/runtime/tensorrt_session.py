"""TensorRT session for a decoder engine: the same new_cache / binding / step interface as the
ONNX Runtime session, on an NVIDIA GPU, with buffers held as torch CUDA tensors.

Each layer's KV cache [B, Nkv, M, D] is one buffer bound to both past_* and present_* (TensorRT's
KV-cache update writes in place). Loading checks, before deserialising, that the TensorRT module
the engine was built with is importable, that a CUDA GPU is present and that its compute
capability is one of the engine's targets; otherwise it says plainly what the engine needs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.runtime.config import Capabilities, EngineConfig
from compiler.runtime.plan import read_header
from compiler.runtime.session_api import checked, last_column, no_sampling, whole_cache


class EngineUnavailable(ValueError):
    """This machine cannot run the engine (no GPU, wrong GPU or no TensorRT)."""


def _requirements(cfg: EngineConfig) -> str:
    t = cfg.tensorrt
    return f"an NVIDIA GPU of compute capability {', '.join(t.targets)} and the {t.flavour} {t.version} Python module"


def _open(cfg: EngineConfig):
    """(trt module, torch) or EngineUnavailable with what is missing."""
    need = _requirements(cfg)
    try:
        trt = importlib.import_module(cfg.tensorrt.flavour)
        import torch
    except ImportError as e:
        raise EngineUnavailable(f"this TensorRT engine needs {need}; {e.name} is not installed") from None
    if not torch.cuda.is_available():
        raise EngineUnavailable(f"this TensorRT engine needs {need}; this machine has no usable CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    here = f"SM{major}{minor}"
    if cfg.tensorrt.flavour == "tensorrt_rtx" and here not in cfg.tensorrt.targets:
        raise EngineUnavailable(f"this TensorRT engine needs {need}; this GPU ({torch.cuda.get_device_name()}) is {here}")
    return trt, torch


@dataclass
class TrtKVCache:
    batch: int
    keys: list  # torch tensors [B, Nkv, M, D]
    values: list


class TensorRTSession:
    """The Session (runtime/session_api.py) of a TensorRT engine: device rows, every row bound."""

    SUPPORTS = Capabilities(sliceable=False, paged=False)
    threads = None  # not a CPU session

    def __init__(self, engine_dir: Path, cfg: EngineConfig):
        self.cfg = cfg
        self.capabilities = checked(cfg.capabilities, self.SUPPORTS, "TensorRT")
        self.trt, self.torch = _open(cfg)
        plan = (engine_dir / cfg.model_file).read_bytes()
        read_header(plan[:64])  # refuses a file that is not a TensorRT plan
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineUnavailable(f"{self.cfg.tensorrt.flavour} could not deserialise {cfg.model_file} (see the log above)")
        self.context = self.engine.create_execution_context()
        self.stream = self.torch.cuda.Stream()
        self.dtype = getattr(self.torch, cfg.kv_cache.dtype)

    def new_cache(self, batch: int) -> TrtKVCache:
        kv, torch = self.cfg.kv_cache, self.torch
        shape = (batch, kv.num_kv_heads, kv.max_seq, kv.head_dim)
        make = lambda: torch.zeros(shape, dtype=self.dtype, device="cuda")  # noqa: E731
        return TrtKVCache(batch, [make() for _ in range(kv.num_layers)], [make() for _ in range(kv.num_layers)])

    def cache_rows(self, cache: TrtKVCache, lo: int, hi: int) -> TrtKVCache:
        return whole_cache(cache, lo, hi)

    def release_row(self, cache: TrtKVCache, row: int) -> None:
        """Device rows are allocated whole: nothing goes back."""

    def kv_arrays(self, cache: TrtKVCache) -> list[np.ndarray]:
        raise ValueError("a TensorRT engine's KV cache is device memory: no host arrays")

    def binding(self, cache: TrtKVCache) -> "TrtBinding":
        kv = self.cfg.kv_cache
        for i in range(kv.num_layers):
            for names, buf in (((kv.key_input, kv.key_output), cache.keys[i]), ((kv.value_input, kv.value_output), cache.values[i])):
                self.context.set_input_shape(names[0].format(i=i), tuple(buf.shape))
                for name in names:
                    self.context.set_tensor_address(name.format(i=i), buf.data_ptr())
        return TrtBinding(self)

    def step(self, binding: "TrtBinding", input_ids: np.ndarray, position_ids: np.ndarray,
             logits_positions: np.ndarray | None = None, sampling: dict | None = None) -> np.ndarray:
        """Same contract as DecoderSession.step: logits [B, K, V] at logits_positions [B, K]."""
        no_sampling(sampling)
        B = input_ids.shape[0]
        logits_positions = last_column(input_ids, logits_positions)
        for name, value in (("input_ids", input_ids), ("position_ids", position_ids), ("logits_positions", logits_positions)):
            binding.set_input(name, value)
        logits = binding.logits((B, logits_positions.shape[1], self.cfg.vocab_size))
        with self.torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see the log above)")
        self.stream.synchronize()
        return logits.cpu().numpy()


class TrtBinding:
    """Device buffers for the int32 inputs and the logits, reused while shapes stay the same."""

    def __init__(self, session: TensorRTSession):
        self.s = session
        self._bufs: dict[str, object] = {}

    def set_input(self, name: str, value: np.ndarray) -> None:
        torch, ctx = self.s.torch, self.s.context
        host = torch.from_numpy(np.ascontiguousarray(value, dtype=np.int32))
        buf = self._bufs.get(name)
        if buf is None or tuple(buf.shape) != tuple(host.shape):
            buf = self._bufs[name] = host.to("cuda")
            ctx.set_input_shape(name, tuple(buf.shape))
            ctx.set_tensor_address(name, buf.data_ptr())
        else:
            buf.copy_(host, non_blocking=False)

    def logits(self, shape: tuple[int, ...]):
        buf = self._bufs.get("logits")
        if buf is None or tuple(buf.shape) != shape:
            buf = self._bufs["logits"] = self.s.torch.empty(shape, dtype=self.s.torch.float32, device="cuda")
            self.s.context.set_tensor_address("logits", buf.data_ptr())
        return buf
