"""Helpers the plugin tests share: run a plugin through its decomposition (ONNX Runtime) or its
Triton kernel (the GPU when present, else TRITON_INTERPRET=1 on CPU), and compare."""

from __future__ import annotations

import os

import numpy as np

_ONNX = {np.dtype("float32"): 1, np.dtype("float16"): 10, np.dtype("int64"): 7, np.dtype("int32"): 6}


def run_decomposition(plugin, arrays: list[np.ndarray], attrs: dict | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    types = [(_ONNX[a.dtype], list(a.shape)) for a in arrays]
    model = plugin.model(types, attrs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {p.name: a for p, a in zip(plugin.inputs, arrays)})


def run_kernel(plugin, arrays: list[np.ndarray], attrs: dict | None = None) -> list[np.ndarray]:
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 before triton is imported (plugins/_interpret.py) to run kernels on CPU")
    device = "cuda" if gpu else "cpu"
    outs = plugin.kernel(*[torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays], **plugin.attributes(attrs))
    return [o.cpu().numpy() for o in outs]


def assert_close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    """Max relative error (against the largest reference magnitude) <= rel; integers exactly."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if np.issubdtype(want.dtype, np.integer):
        np.testing.assert_array_equal(got, want)
        return
    g, w = got.astype(np.float64), want.astype(np.float64)
    err = np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)
    assert err <= rel, f"max relative error {err:.3g} > {rel}"
