"""`kiln plugins new NAME` and `kiln plugins list`.

`new` writes plugins/NAME/ from the jinja2 templates in plugins/_template/: schema, reference,
decomposition, Triton kernel and a test, which fails until the reference is written (so a new
plugin cannot pass CI as a stub). `list` shows every plugin with the backends it binds and how
each binding is tested.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import jinja2

from plugins import ROOT, available

TEMPLATES = ROOT / "_template"
FILES = {"__init__.py.j2": "__init__.py", "schema.py.j2": "schema.py", "reference.py.j2": "reference.py",
         "decomposition.py.j2": "decomposition.py", "kernel.py.j2": "kernel.py", "test_plugin.py.j2": "test_{name}.py"}


def new(name: str, root: Path = ROOT) -> Path:
    """Scaffold root/name (atomically: a temp dir renamed into place); returns the folder."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"plugin name {name!r} must be a Python identifier in lower case (e.g. rope_cache)")
    dest = root / name
    if dest.exists():
        raise ValueError(f"{dest} already exists; choose another name")
    op_type = "".join(part.capitalize() for part in name.split("_"))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        for src, out in FILES.items():
            (tmp / out.format(name=name)).write_text(env.get_template(src).render(name=name, op_type=op_type))
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def rows() -> list[dict]:
    """One row per plugin: op, ONNX Runtime / TensorRT / kernel bindings and how they are tested."""
    out = []
    for name, p in available().items():
        folder = ROOT / name
        tests = sorted(t.name for t in folder.glob("test_*.py"))
        text = "\n".join(t.read_text() for t in folder.glob("test_*.py"))
        gpu = p.kernel is not None  # a TensorRT plugin layer runs the GPU kernel
        out.append({
            "name": name, "op": f"kiln::{p.op_type}",
            "onnxruntime": "decomposition (ONNX function)" + (", tested vs reference" if "run_decomposition" in text else ""),
            "tensorrt": ("IPluginV3 via the parser" + (", engine built in CI" if "build_engine" in text else ", untested"))
            if gpu else "none (no GPU kernel for a plugin layer)",
            "kernel": ("Triton" + (", interpreter-tested in CI" if "run_kernel" in text else ", untested")) if gpu else "none",
            "cpu": ("C, one build per ISA, between the engine's graph parts" + (", tested vs reference in CI" if "cpu.load" in text
                                                                                 else ", untested"))
            if (folder / "cpu.py").is_file() else "none",
            "gpu": ("timings in README.md" if (folder / "README.md").is_file() else "not measured on a GPU yet") if gpu else "no GPU kernel",
            "rewrite": "yes" if p.rewrite else "no", "tests": tests,
        })
    return out
