"""`make bench-build`: build cost against model size, per quantisation scheme (a benchmark, not a test).

Random-weight Llama-shaped bf16 checkpoints of 0.5B and 2B parameters (benchmarks/make_checkpoint.py:
one width, 14 and 73 layers, so what differs is depth) are made once under .cache/bench-build/.
Each scheme is built for ONNX Runtime on each size, one build at a time, each in its own process
(`kiln build --json`) without the quality gate (random weights have no quality to gate; the gate
evaluates whole engines, which is not the build's memory). Reported per scheme and size: wall
time, peak RSS of the build process tree (the largest of the build and any child it ran), the
checkpoint read rate (checkpoint bytes over wall time) and the build's own stages (calibration,
passes, emit); then the 2B/0.5B ratio of peak RSS, and for schemes that calibrate, the seconds of
calibration and search (statistics, then the scheme's searches in its pass) per 100M parameters.
Each build gets an empty KILN_CACHE, so no cached calibration is reused. Targets (issue 16): RSS(2B) <= 1.15x RSS(0.5B) for every scheme;
int4-awq calibration <= 60 s per 100M parameters on 2 cores; fp32 and int4-rtn >= 100 MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench-build"
SCHEMES = {
    "fp32": None,
    "int4-rtn": {"scheme": "int4-rtn", "group_size": 32},
    "int4-awq": {"scheme": "int4-awq", "group_size": 32, "calibration": {"samples": 8, "seq_len": 256}},
    "int8-wo": {"scheme": "int8-wo"},
    "int8-sq": {"scheme": "int8-sq", "calibration": {"samples": 8, "seq_len": 256}},
    "fp8": {"scheme": "fp8", "calibration": {"samples": 8, "seq_len": 256}},
}


def checkpoint(size: str) -> tuple[Path, int, int]:
    """(dir, parameters, bytes of safetensors) of the size's checkpoint, made when missing."""
    out = CACHE / f"llama-{size.lower()}"
    if not (out / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_checkpoint.py"), size, str(out)], check=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    nbytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return out, index["metadata"]["total_size"] // 2, nbytes


def build_once(scheme: str, src: Path, out_root: Path, max_seq: int) -> dict:
    recipe = {"schema": 1, "name": f"bench-{scheme}", "source": str(src), "max_seq": max_seq, "max_batch": 1,
              "quality": {"gate": False}}
    if SCHEMES[scheme] is not None:
        recipe["quantization"] = SCHEMES[scheme]
    path = out_root / f"{scheme}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-cache-") as cache:  # no cached calibration: it is measured
        out = subprocess.run([sys.executable, "-m", "compiler.cli", "build", str(path), "--out", str(out_root), "--force",
                              "--json", "--quiet"], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "KILN_CACHE": cache})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # this process runs one build (see _isolated)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(peak_kib / 2**20, 3),
            "build_peak_rss_gib": round(info["build"]["peak_rss_bytes"] / 2**30, 3),
            "stages": info["build"].get("stages", {})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--sizes", default="0.5B,2B")
    p.add_argument("--max-seq", type=int, default=2048)
    p.add_argument("--out", default=str(ROOT / "bench-results" / "bench-build.json"))
    a = p.parse_args()
    schemes = a.schemes.split(",")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        print(f"unknown scheme {unknown[0]} (known: {', '.join(SCHEMES)})", file=sys.stderr)
        return 2
    report = {"machine": machine(), "threads": os.cpu_count(), "sizes": {}, "builds": {}}
    sizes = a.sizes.split(",")
    for size in sizes:
        src, params, nbytes = checkpoint(size)
        report["sizes"][size] = {"parameters": params, "checkpoint_bytes": nbytes}
    work = CACHE / "out"
    work.mkdir(parents=True, exist_ok=True)
    for scheme in schemes:
        for size in sizes:  # each build in a fresh process tree: RUSAGE_CHILDREN is per waited child
            res = _isolated(scheme, size, a.max_seq, work)
            if "wall_s" in res:
                res["read_mb_s"] = round(report["sizes"][size]["checkpoint_bytes"] / 1e6 / res["wall_s"], 1)
                # a calibrated scheme's cost: collecting statistics, then its searches (in the passes)
                cal = res["stages"].get("calibration_s", 0) + res["stages"].get("passes_s", 0)
                if SCHEMES[scheme] and "calibration" in SCHEMES[scheme]:
                    res["calibration_s_per_100m"] = round(cal / (report["sizes"][size]["parameters"] / 1e8), 1)
            report["builds"].setdefault(scheme, {})[size] = res
            print(f"{scheme:9} {size:5} {json.dumps(res)}", file=sys.stderr, flush=True)
    for scheme, by_size in report["builds"].items():
        if all("peak_rss_gib" in by_size.get(s, {}) for s in ("0.5B", "2B")):
            by_size["rss_ratio_2b_over_0.5b"] = round(by_size["2B"]["peak_rss_gib"] / by_size["0.5B"]["peak_rss_gib"], 3)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0


def _isolated(scheme: str, size: str, max_seq: int, work: Path) -> dict:
    """One build from a child of its own, so the process-tree peak is this build's alone."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_build as b; "
            f"src, _, _ = b.checkpoint({size!r}); "
            f"print(json.dumps(b.build_once({scheme!r}, src, __import__('pathlib').Path({str(work)!r}), {max_seq})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(report: dict) -> None:
    print(f"\n{'scheme':9} {'size':5} {'wall s':>7} {'peak GiB':>9} {'MB/s':>7} {'calib+search s/100M':>20}  stages")
    for scheme, by_size in report["builds"].items():
        for size, r in by_size.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                print(f"{scheme:9} {size:5} failed: {r['error']}")
                continue
            print(f"{scheme:9} {size:5} {r['wall_s']:>7} {r['peak_rss_gib']:>9} {r['read_mb_s']:>7} "
                  f"{r.get('calibration_s_per_100m', ''):>20}  {r['stages']}")
        if "rss_ratio_2b_over_0.5b" in by_size:
            print(f"{scheme:9} peak RSS 2B / 0.5B = {by_size['rss_ratio_2b_over_0.5b']}")


if __name__ == "__main__":
    sys.exit(main())
