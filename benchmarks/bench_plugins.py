"""`make bench-plugins` (needs an NVIDIA GPU): each plugin kernel's time against its torch eager
equivalent and against the memory-bandwidth bound for the bytes it moves.

Shapes are decode-time ones for SmolLM2-like and 8B-like models. The bandwidth bound is bytes
moved / the device's peak bandwidth (--peak-gbs, default H100/H200 HBM3(e) 3350 GB/s); the
table reports the achieved fraction (the target for memory-bound kernels is >= 70%). Times are
CUDA-event medians over --iters calls after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, iters: int) -> float:
    import torch

    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)  # us
    return statistics.median(times)


def rmsnorm_cases(dtype):
    import torch

    import plugins

    p = plugins.get("rmsnorm_residual")
    for rows, H in ((1, 576), (8, 576), (8, 4096), (256, 4096)):
        x, r = (torch.randn(rows, H, device="cuda", dtype=dtype) for _ in range(2))
        w = torch.rand(H, device="cuda", dtype=dtype)

        def eager():
            s = x + r
            return torch.nn.functional.rms_norm(s, (H,), w, 1e-5), s

        moved = (4 * rows * H + H) * x.element_size()  # read x, r, w; write y, sum
        yield f"rmsnorm_residual {rows}x{H} {dtype}", (lambda: p.run_kernel(x, r, w, epsilon=1e-5)), eager, moved


def sample_cases():
    import torch

    import plugins

    p = plugins.get("sample")
    for B, V in ((1, 49152), (8, 49152), (8, 128256)):
        logits = torch.randn(B, V, device="cuda")
        t, k, tp, u = (torch.full((B,), 0.8, device="cuda"), torch.full((B,), 50, device="cuda", dtype=torch.int64),
                       torch.full((B,), 0.9, device="cuda"), torch.rand(B, device="cuda"))

        def eager():
            z = logits / t[:, None]
            s, order = torch.sort(z, descending=True, stable=True)
            pr = torch.softmax(s, -1)
            return order, torch.cumsum(pr, -1)

        yield f"sample {B}x{V}", (lambda: p.run_kernel(logits, t, k, tp, u)), eager, B * V * 4


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--peak-gbs", type=float, default=3350.0)
    ap.add_argument("--out", default="bench-results/bench-plugins.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_plugins needs an NVIDIA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    rows = []
    cases = [*rmsnorm_cases(torch.float16), *rmsnorm_cases(torch.bfloat16), *sample_cases()]
    for name, kernel, eager, moved in cases:
        tk, te = timed(kernel, a.iters), timed(eager, a.iters)
        bound = moved / (a.peak_gbs * 1e9) * 1e6
        rows.append({"case": name, "kernel_us": tk, "eager_us": te, "bound_us": bound, "bandwidth_fraction": bound / tk})
        print(f"{name:40s} kernel {tk:8.2f} us  eager {te:8.2f} us ({te / tk:.2f}x)  bound {bound:7.2f} us ({bound / tk:.0%})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "peak_gbs": a.peak_gbs, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
