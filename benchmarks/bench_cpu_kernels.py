"""CPU kernel routes on the three hot spots of a SmolLM2-shaped engine (docs/decisions/cpu-kernels.md).

    attention prefill   600 tokens, GQA 9 query / 3 KV heads, head_dim 64, causal
    attention decode    8 rows, one new token each over an 800-token past
    int4 product        x [M, 576] @ W [576, 1536], 4-bit weights in blocks of 32, M = 1, 4, 16
                        (LAYERS products with distinct weights in one call, reported per product)

Routes, each timed on the same inputs in this process (median of `--reps` after warm-up):
    ort        ONNX Runtime's CPU provider: GroupQueryAttention (what kiln's contrib graph runs),
               the standard Attention op (kiln's standard graph), MatMulNBits at accuracy level 4
    openvino   OpenVINO's CPU plugin: ScaledDotProductAttention (its fused SDPA), a u4 weight with
               per-block scales behind MatMul (its compressed-weight FullyConnected); skipped when
               `openvino` is not installed
    tvm        Apache TVM: the int4 product as a TIR kernel, LLVM for this CPU, default schedule;
               skipped when `apache-tvm` is not installed
    own        kiln::PagedAttention's CPU kernel (plugins/paged_attention, the build this CPU runs):
               fp32 rows and int8 rows with a scale per token and head, read in place
With --artifact (a kiln fp32 contrib build of SmolLM2-135M), also the whole engine: one decode
step of batch 1 over a 256-token past, ONNX Runtime with kiln's in-place KV binding vs OpenVINO
reading the same model.onnx (past in, present out, swapped each step).
Outputs are checked against numpy before timing. Prints a table and writes JSON with the CPU,
its ISA flags and the thread count. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # the routes, plugins/
from cpu_kernels.routes import (BLOCK, D, HKV, HQ, K, N, ort_attention, ort_gqa, ort_int4, ov_compile, ov_int4,  # noqa: E402
                                own_attention, ov_sdpa, tvm_int4)
from serve_load import machine  # noqa: E402

PREFILL, ROWS, PAST = 600, 8, 800
MS = (1, 4, 16)
ATTN_LAYERS = 30  # SmolLM2's layers: decode attention over 30 caches in one call streams ~300 MB
LAYERS = 8  # int4 products per call (distinct weights, outputs summed): a call's overhead is not a kernel's


_EVICT: list[np.ndarray] = []  # 1 GiB once made: more than the last-level cache (480 MiB here)


def timed(fn, reps: int, cold: bool = False) -> float:
    """Median milliseconds of fn() after two warm-up calls. cold: each timed call after reading
    1 GiB (clean lines: the inputs are evicted, as an engine's 30 layers of KV and weights are),
    so a kernel is timed on the memory traffic it causes; warm: on a working set in cache."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        if cold:
            if not _EVICT:
                _EVICT.append(np.ones(256 << 20, np.float32))
            float(_EVICT[0].sum())
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# -- reference data -----------------------------------------------------------------------------
def attention_inputs(rng, rows: int, new: int, past: int):
    """q [rows, HQ, new, D]; k, v [rows, HKV, past + new, D] (the new tokens' keys last)."""
    q = rng.standard_normal((rows, HQ, new, D), dtype=np.float32)
    k = rng.standard_normal((rows, HKV, past + new, D), dtype=np.float32)
    v = rng.standard_normal((rows, HKV, past + new, D), dtype=np.float32)
    return q, k, v


def attention_ref(q, k, v) -> np.ndarray:
    """Causal GQA over the whole key range: [rows, HQ, new, D]."""
    rows, _, new, _ = q.shape
    total = k.shape[2]
    kk, vv = np.repeat(k, HQ // HKV, axis=1), np.repeat(v, HQ // HKV, axis=1)
    s = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(D)  # [rows, HQ, new, total]
    mask = np.arange(total)[None, :] > (total - new + np.arange(new))[:, None]
    s = np.where(mask, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ vv


def int4_weights(rng):
    """LAYERS x (symmetric 4-bit codes [N, K] in 0..15 with zero point 8, scales [N, K / BLOCK])."""
    return [(rng.integers(0, 16, size=(N, K), dtype=np.uint8),
             (rng.random((N, K // BLOCK), dtype=np.float32) * 0.02 + 0.005).astype(np.float32)) for _ in range(LAYERS)]


def dequantised(codes, scales) -> np.ndarray:
    """W [K, N] fp32."""
    w = (codes.astype(np.float32) - 8).reshape(N, K // BLOCK, BLOCK) * scales[:, :, None]
    return w.reshape(N, K).T


def int4_ref(x, weights) -> np.ndarray:
    return sum(x @ dequantised(c, s) for c, s in weights)


# -- the whole engine ---------------------------------------------------------------------------
ENGINE_PAST = 256


def engine_steps(artifact: Path, threads: int, reps: int) -> list[dict]:
    """ms per decode step, batch 1, past ENGINE_PAST: kiln's ONNX Runtime session and OpenVINO."""
    from compiler.runtime import load

    engine = load(artifact, threads=threads)
    cfg, s = engine.config, engine.session
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, cfg.vocab_size, ENGINE_PAST + 1)
    io = s.binding(s.new_cache(1))
    s.step(io, prompt[None, :ENGINE_PAST], np.arange(ENGINE_PAST)[None])
    tok, pos = prompt[None, ENGINE_PAST:], np.array([[ENGINE_PAST]])
    want = s.step(io, tok, pos).copy()
    rows = [{"case": "engine decode step (past 256)", "route": "ort kiln session",
             "ms": timed(lambda: s.step(io, tok, pos), reps)}]
    try:
        rows.append(_ov_engine(artifact, cfg, prompt, want, threads, reps))
    except ImportError as e:
        rows.append({"case": rows[0]["case"], "route": "openvino model.onnx", "skipped": f"{e.name} is not installed"})
    return rows


def _ov_engine(artifact: Path, cfg, prompt, want, threads: int, reps: int) -> dict:
    import openvino as ov

    kv = cfg.kv_cache
    model = ov.Core().read_model(str(artifact / cfg.model_file))
    names = [n.format(i=i) for i in range(kv.num_layers) for n in (kv.key_input, kv.value_input)]
    # OpenVINO's GroupQueryAttention returns present = past + new (not ONNX Runtime's shared
    # max_seq buffer), so the past is fed at its length: the cache is copied and grows each step
    model.reshape({n: ov.PartialShape([1, kv.num_kv_heads, -1, kv.head_dim]) for n in names})
    req = ov_compile(model, threads)
    past = {n: np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), np.float32) for n in names}

    def step(ids, pos):
        feeds = {"input_ids": ids, "position_ids": pos, "logits_positions": np.array([[ids.shape[1] - 1]]), **past}
        req.infer({k: v for k, v in feeds.items() if k in {i.get_any_name() for i in req.model_inputs}})
        for n in names:  # present_* -> the next step's past_*
            past[n] = req.get_tensor(n.replace("past_", "present_")).data.copy()
        return req.get_tensor("logits").data

    step(prompt[None, :ENGINE_PAST], np.arange(ENGINE_PAST)[None])
    snapshot = {n: v.copy() for n, v in past.items()}
    tok, pos = prompt[None, ENGINE_PAST:], np.array([[ENGINE_PAST]])
    err = float(np.abs(step(tok, pos).reshape(want.shape) - want).max())

    def again():
        past.update(snapshot)
        step(tok, pos)
    return {"case": "engine decode step (past 256)", "route": "openvino model.onnx", "ms": timed(again, reps), "max_err": err}


# -- the table ----------------------------------------------------------------------------------
def run_case(name: str, route: str, make, ref: np.ndarray, reps: int, threads: int, tol: float) -> dict:
    try:
        fn, view = make(threads)
    except ImportError as e:
        return {"case": name, "route": route, "skipped": f"{e.name} is not installed"}
    except Exception as e:  # noqa: BLE001  (a route that cannot express the case is a result too)
        return {"case": name, "route": route, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    err = float(np.abs(view(fn()) - ref).max())
    if err > tol:
        return {"case": name, "route": route, "skipped": f"wrong result (max error {err:.3g})"}
    per = LAYERS if name.startswith("int4") else ATTN_LAYERS if "layers" in name else 1
    return {"case": name, "route": route, "ms": timed(fn, reps) / per, "cold_ms": timed(fn, reps, cold=True) / per,
            "max_err": err}


def cases(rng):
    q, k, v = attention_inputs(rng, 1, PREFILL, 0)
    ref = attention_ref(q, k, v)
    yield "prefill attention 600 tok", ref, 2e-3, {
        "ort GroupQueryAttention": lambda t: ort_gqa(q, k, v, t), "ort Attention": lambda t: ort_attention(q, k, v, t),
        "openvino SDPA": lambda t: ov_sdpa(q, k, v, t), "own C kernel fp32 KV": lambda t: own_attention(q, k, v, t)}
    q, k, v = attention_inputs(rng, ROWS, 1, PAST)
    ref = attention_ref(q, k, v)
    yield f"decode attention {ROWS} x {PAST} past", ref, 2e-3, {
        "ort GroupQueryAttention": lambda t: ort_gqa(q, k, v, t), "ort Attention": lambda t: ort_attention(q, k, v, t),
        "openvino SDPA": lambda t: ov_sdpa(q, k, v, t), "own C kernel fp32 KV": lambda t: own_attention(q, k, v, t)}
    yield f"decode attention {ROWS} x {PAST} past, int8 KV", ref, 3e-2, {
        "own C kernel int8 KV": lambda t: own_attention(q, k, v, t, "int8")}
    yield f"decode attention x{ATTN_LAYERS} layers (per layer)", ref, 3e-2, {
        "ort GroupQueryAttention": lambda t: ort_gqa(q, k, v, t, ATTN_LAYERS),
        "own C kernel fp32 KV": lambda t: own_attention(q, k, v, t, "float32", ATTN_LAYERS),
        "own C kernel int8 KV": lambda t: own_attention(q, k, v, t, "int8", ATTN_LAYERS)}
    weights = int4_weights(rng)
    for M in MS:
        x = rng.standard_normal((M, K), dtype=np.float32)
        ref = int4_ref(x, weights)
        tol = 0.05 * float(np.abs(ref).max())  # int8 activations: a few percent of the largest output
        yield f"int4 product M={M}", ref, tol, {
            "ort MatMulNBits": lambda t, x=x: ort_int4(x, weights, t),
            "openvino u4 FC": lambda t, x=x: ov_int4(x, weights, t),
            "tvm TIR (default schedule)": lambda t, x=x: tvm_int4(x, weights, t)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="bench-results/bench-cpu-kernels.json")
    p.add_argument("--artifact", type=Path, help="a kiln fp32 contrib build of SmolLM2-135M: time whole decode steps too")
    a = p.parse_args()
    rows = []
    for name, ref, tol, routes in cases(np.random.default_rng(0)):
        for route, make in routes.items():
            rows.append(run_case(name, route, make, ref, a.reps, a.threads, tol))
            r = rows[-1]
            print(f"{name:40s} {route:28s} " + (f"{r['ms']:9.3f} ms warm {r['cold_ms']:9.3f} ms cold" if "ms" in r
                                                   else f"skipped: {r['skipped']}"), flush=True)
    if a.artifact:
        for r in engine_steps(a.artifact, a.threads, a.reps):
            rows.append(r)
            print(f"{r['case']:32s} {r['route']:28s} " + (f"{r['ms']:9.3f} ms" if "ms" in r else f"skipped: {r['skipped']}"))
    out = {"machine": machine(), "threads": a.threads, "reps": a.reps, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
