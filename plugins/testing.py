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
    outs = plugin.run_kernel(*[torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays], **plugin.attributes(attrs))
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


def gpu_inputs(plugin) -> tuple[list[np.ndarray], dict, float]:
    """Decode-shaped inputs for a plugin's GPU check: (arrays, attrs, tolerance)."""
    rng = np.random.default_rng(0)
    if plugin.op_type == "RmsNormResidual":
        x, r = (rng.standard_normal((8, 4096)).astype(np.float16) for _ in range(2))
        return [x, r, rng.uniform(0.5, 1.5, 4096).astype(np.float16)], {"epsilon": 1e-5}, 1e-2
    if plugin.op_type == "Sample":
        B, V = 8, 49152
        return [(rng.standard_normal((B, V)) * 3).astype(np.float32), np.full(B, 0.8, np.float32), np.full(B, 50, np.int64),
                np.full(B, 0.9, np.float32), rng.uniform(0, 1, B).astype(np.float32)], {}, 0.0
    B, NQ, NKV, M, D = 4, 32, 8, 1024, 128
    pos = np.array([[100], [500], [1000], [1023]], dtype=np.int64)
    return [rng.standard_normal((B, NQ, 1, D)).astype(np.float16), rng.standard_normal((B, NKV, M, D)).astype(np.float16),
            rng.standard_normal((B, NKV, M, D)).astype(np.float16), pos, pos[:, 0] + 1], {"window": 256}, 1e-2


def gpu_check(plugin) -> None:
    arrays, attrs, tol = gpu_inputs(plugin)
    want = plugin.reference(*arrays, **plugin.attributes(attrs))
    for got, ref in zip(run_kernel(plugin, arrays, attrs), want):
        assert_close(got, ref, tol)
