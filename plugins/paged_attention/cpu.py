"""The CPU binding of kiln::PagedAttention: cpu_kernel.c built per instruction set, chosen at run time.

    kernel = load(threads=2)                      # the best build this CPU runs (built on first use)
    kernel.isa                                    # "avx512" | "avx2" | "portable" | "numpy"
    kernel(q, k, v, k_rows, v_rows, k_scales, v_scales, positions, heads=(9, 3), dtype="int8", out=y)

Builds (the system C compiler, OpenMP): `avx512` (-march=x86-64-v4), `avx2` (x86-64-v3: AVX2,
FMA, F16C) and `portable` (the compiler's baseline, any CPU), kept under KILN_CACHE/kernels/ by
the source's digest (`make setup` builds them; a server without a compiler uses what is there).
The choice reads the CPU's flags (/proc/cpuinfo): a CPU without AVX-512 or AVX2 gets the portable
build with a one-line notice, never an illegal instruction; without any build (no compiler), the
numpy reference runs, with a notice. KILN_CPU_ISA=avx2|portable|numpy forces a lower path (for
debugging and the fallback tests). Imports only the standard library and numpy (the runtime's).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from plugins.paged_attention.reference import reference

SOURCE = Path(__file__).with_name("cpu_kernel.c")
ORDER = ("avx512", "avx2", "portable")  # best first
FLAGS = {"avx512": ["-march=x86-64-v4", "-mtune=generic"], "avx2": ["-march=x86-64-v3", "-mtune=generic"], "portable": []}
NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c", "bmi2"},
         "avx2": {"avx2", "fma", "f16c", "bmi2"}, "portable": set()}
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2, "int8": 3, "float8_e4m3fn": 4}
_ptr = ctypes.c_void_p


class KernelError(RuntimeError):
    """The kernel refused its shapes or ran out of memory."""


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "kernels"


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU ({} where /proc/cpuinfo is unreadable or not x86)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def runnable(flags: set[str]) -> list[str]:
    """The builds a CPU with these flags can run, best first (portable always)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return [isa for isa in ORDER if isa == "portable" or (x86 and NEEDS[isa] <= flags)]


def library(isa: str) -> Path | None:
    """The shared library of one build, compiled now when missing (None: no compiler, or it failed)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS[isa]).encode()).hexdigest()[:16]
    path = cache_dir() / f"paged_attention-{isa}-{platform.machine()}-{digest}.so"
    if path.exists():
        return path
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        cmd = [cc, "-O3", "-ffast-math", "-fopenmp", "-fPIC", "-shared", *FLAGS[isa], str(SOURCE), "-o", str(out), "-lm"]
        try:
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                return None
        except OSError:  # CC names no program
            return None
        os.replace(out, path)  # whole or not at all: another process may be loading it
    return path


def build_all() -> dict[str, Path | None]:
    """Every build this CPU can run (`make setup`)."""
    return {isa: library(isa) for isa in runnable(cpu_flags())}


class Kernel:
    """kiln::PagedAttention over numpy rows, through one build (or the numpy reference)."""

    def __init__(self, isa: str, path: Path | None, threads: int):
        self.isa = isa
        self._lib = None
        if path is not None:
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads beside ONNX Runtime's
            self._lib = ctypes.CDLL(str(path))
            self._lib.kiln_init()
            self._lib.kiln_set_threads(threads)
            self._lib.kiln_paged_attention.restype = ctypes.c_int
            self._lib.kiln_paged_attention.argtypes = [_ptr] * 8 + [ctypes.c_int] * 8 + [ctypes.c_float, _ptr]

    def __call__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, k_rows: np.ndarray, v_rows: np.ndarray,
                 k_scales: np.ndarray | None, v_scales: np.ndarray | None, positions: np.ndarray,
                 heads: tuple[int, int], dtype: str, window: int = 0, scale: float = 0.0,
                 out: np.ndarray | None = None) -> np.ndarray:
        """q [B, S, Nq*D], k/v [B, S, Nkv*D] float32; rows [B, Nkv, M, D] (written in place), scales
        [B, Nkv, M(, 1)] float32 for int8/fp8 rows; positions [B, S] int64. Returns y [B, S, Nq*D]."""
        q, k, v = (np.ascontiguousarray(x, dtype=np.float32) for x in (q, k, v))
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        out = np.empty((*q.shape[:2], heads[0] * k_rows.shape[3]), np.float32) if out is None else out
        self.prepare(q, k, v, k_rows, v_rows, k_scales, v_scales, positions, heads, dtype, window, scale, out)()
        return out

    def prepare(self, q, k, v, k_rows, v_rows, k_scales, v_scales, positions, heads: tuple[int, int], dtype: str,
                window: int, scale: float, out: np.ndarray) -> Callable[[], None]:
        """The call over these exact buffers (contiguous, of the types __call__ takes), made ready
        once: a step whose buffers are fixed (runtime/kernel_session.py's plans) just calls it."""
        (B, S, _), (nq, nkv), (M, D) = q.shape, heads, k_rows.shape[2:]
        scale = scale or 1.0 / float(np.sqrt(D))
        if self._lib is None:
            def run() -> None:
                out[...] = reference(q, k, v, k_rows, v_rows, k_scales, v_scales, positions, nq, nkv, scale, window, dtype,
                                     inplace=True)
            return run
        arrays = (q, k, v, k_rows, v_rows, *(x for x in (k_scales, v_scales) if x is not None), positions, out)
        if any(not a.flags.c_contiguous for a in arrays):
            raise KernelError("PagedAttention: inputs, KV rows and scales must be contiguous (row spans of the cache)")
        ptrs = [None if a is None else a.ctypes.data for a in (q, k, v, k_rows, v_rows, k_scales, v_scales, positions)]
        call = functools.partial(self._lib.kiln_paged_attention, *ptrs, B, S, nq, nkv, D, M, DTYPES[dtype], window, scale,
                                 out.ctypes.data)

        def run(keep=(q, k, v, k_rows, v_rows, k_scales, v_scales, positions, out)) -> None:  # keep: the pointers' owners
            rc = call()
            if rc:
                raise KernelError(f"PagedAttention: {nq}/{nkv} heads of {D} are outside the kernel (at most 32 query heads "
                                  "a KV head, head_dim 256)" if rc == -1 else "PagedAttention: out of memory")
        return run


def load(threads: int = 1, flags: set[str] | None = None, forced: str | None = None, notice=None) -> Kernel:
    """The best path this CPU runs; `notice(line)` (default: stderr) hears once why it is not the best."""
    notice = notice or (lambda line: print(line, file=sys.stderr))
    forced = forced or os.environ.get("KILN_CPU_ISA") or None
    if forced is not None and forced not in (*ORDER, "numpy"):
        raise ValueError(f"KILN_CPU_ISA={forced!r} is not one of {', '.join((*ORDER, 'numpy'))}")
    choices = runnable(cpu_flags() if flags is None else flags)  # best first
    if forced is not None:  # that path and those below it
        choices = [c for c in choices if forced != "numpy" and ORDER.index(c) >= ORDER.index(forced)]
    for isa in choices:
        path = library(isa)
        if path is not None:
            if isa == "portable" and forced is None:
                notice("kiln: this CPU has neither AVX-512 nor AVX2 (x86-64-v3): attention runs the portable kernel (slower)")
            return Kernel(isa, path, threads)
    if forced != "numpy":
        notice("kiln: no C compiler built the attention kernel (install gcc, then `make setup`): attention runs in numpy (slow)")
    return Kernel("numpy", None, threads)


if __name__ == "__main__":  # `make setup`: build what this CPU runs, so servers need no compiler at load time
    for isa, path in build_all().items():
        print(f"paged_attention {isa}: {path or 'not built (no C compiler, or it failed)'}")
