"""Content-addressed build caching.

- A build key: sha256 of the resolved recipe, the source digest, the kiln version and the
  backend's name and version. An artifact whose kiln.json carries the same key and whose files
  still match their digests is up to date: `kiln build` returns at once (`--force` rebuilds).
- Calibration statistics, keyed the same way on what they depend on (source, calibration
  settings, the passes before quantisation, kiln version), are kept in KILN_CACHE/calibration as
  .npz (no pickles) and shared by every recipe with those inputs (AWQ, SmoothQuant and fp8 of
  one model calibrate once). Written to a temp file and renamed: `make -j` safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from compiler import __version__
from compiler.frontend.sources import cache_root
from compiler.runtime.manifest import MANIFEST, read_manifest
from compiler.runtime.verify import verify_artifact


def key(*parts) -> str:
    blob = json.dumps([__version__, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def up_to_date(dest: Path, build_key: str) -> dict | None:
    """The artifact's manifest when it was built with build_key and is intact, else None."""
    if not (dest / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(dest)
        if manifest.build_key != build_key:
            return None
        verify_artifact(dest)
    except (ValueError, OSError):  # ArtifactTampered is a ValueError
        return None
    return manifest.data


def source_digest(ckpt) -> str:
    """ckpt.digest(), remembered per (path, size, mtime) of its files: an unchanged source is not
    re-hashed on every up-to-date check."""
    paths = ckpt.hashed_files()
    stamp = key("stat", [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths])
    memo = cache_root() / "digests" / stamp
    if memo.is_file():
        return memo.read_text().strip()
    digest = ckpt.digest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{stamp}.{os.getpid()}.tmp")
    tmp.write_text(digest + "\n")
    tmp.replace(memo)
    return digest


def _stats_path(stats_key: str) -> Path:
    return cache_root() / "calibration" / f"{stats_key}.npz"


def load_stats(stats_key: str) -> dict | None:
    """Cached statistics; each linear's rows are read from the file when used, not now."""
    from compiler.passes.quant.calibration import ActStats

    path = _stats_path(stats_key)
    if not path.is_file():
        return None

    def member(key: str):
        def read():
            with np.load(path, allow_pickle=False) as z:
                return z[key]
        return read

    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["names"]]
        return {n: ActStats(z[f"{i}.mean_abs"], z[f"{i}.absmax"], float(z[f"{i}.max_abs"]), member(f"{i}.rows"), int(z[f"{i}.count"]))
                for i, n in enumerate(names)}


def save_stats(stats_key: str, stats: dict) -> None:
    """An .npz written one array at a time (one linear's rows in memory at once)."""
    path = _stats_path(stats_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")

    def arrays():
        yield "names", np.array(list(stats))
        for i, s in enumerate(stats.values()):
            yield from ((f"{i}.mean_abs", s.mean_abs), (f"{i}.absmax", s.absmax), (f"{i}.max_abs", np.array(s.max_abs)),
                        (f"{i}.rows", s.rows), (f"{i}.count", np.array(s.count)))

    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
    tmp.replace(path)
