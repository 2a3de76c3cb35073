"""Which TensorRT is importable, and the few places where `tensorrt_rtx` and `tensorrt` differ.

Everything else in the backend uses the shared Python API shape of the two modules. The network
API is used, not the ONNX parser: the parser drops Attention's per-sequence KV lengths and
cannot emit a KV-cache update with an in-place cache (see network.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from compiler.errors import KilnError

# ComputeCapability names as recipes spell them. TensorRT-RTX has no SM90/SM100 targets.
TARGETS = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")


@dataclass(frozen=True)
class Flavour:
    name: str  # "tensorrt_rtx" | "tensorrt"
    version: str
    trt: ModuleType

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"


def load(preferred: str = "auto") -> Flavour:
    """tensorrt_rtx first (it builds without a GPU), then tensorrt; `preferred` pins one."""
    names = ("tensorrt_rtx", "tensorrt") if preferred == "auto" else (preferred,)
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        return Flavour(name, mod.__version__, mod)
    raise KilnError(f"the tensorrt backend needs {' or '.join(names)}, which is not installed",
                    "pip install 'kiln[tensorrt]' (the tensorrt-rtx wheels), or set backend: onnxruntime")


def network_flags(f: Flavour) -> int:
    """Strongly typed networks: TensorRT-RTX knows no other kind; for tensorrt it keeps the
    dtypes of the graph instead of letting the builder pick precisions."""
    return 1 << int(f.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def set_targets(f: Flavour, config, targets: list[str]) -> None:
    """Compute-capability targets: a TensorRT-RTX feature (AOT for several GPUs). tensorrt builds
    for the GPU it runs on, so it needs exactly ["CURRENT"]-like behaviour: targets are recorded only."""
    if not f.is_rtx:
        return
    config.num_compute_capabilities = len(targets)
    for i, t in enumerate(targets):
        config.set_compute_capability(getattr(f.trt.ComputeCapability, t), i)


def has_timing_cache(f: Flavour) -> bool:
    """TensorRT-RTX builds ahead of time without timing kernels: its timing-cache calls are
    deprecated no-ops (it warns so), so the cache is loaded and saved for tensorrt only."""
    return not f.is_rtx
