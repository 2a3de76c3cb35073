"""`kiln plugins new` writes a complete plugin folder whose test fails until it is implemented;
`kiln plugins list` shows each plugin with its bindings; recipes refuse unknown plugins."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from compiler.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_new_plugin_test_fails_until_implemented(tmp_path, capsys):
    """The scaffold's own tests, run: they fail on the stub, pass once the reference matches what
    the scaffold's decomposition and kernel compute (a copy), and fail again on a wrong reference."""
    shutil.copytree(ROOT / "plugins", tmp_path / "plugins", ignore=shutil.ignore_patterns("__pycache__"))
    assert main(["plugins", "new", "demo_op", "--root", str(tmp_path / "plugins")]) == 0
    folder = tmp_path / "plugins" / "demo_op"
    assert sorted(p.name for p in folder.iterdir()) == ["__init__.py", "decomposition.py", "kernel.py", "reference.py",
                                                         "schema.py", "test_demo_op.py"]
    assert not list((tmp_path / "plugins").glob(".demo_op.*")), "the scaffold's temp dir was left"

    def run_generated_tests() -> str:
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                              "-c", os.devnull, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        return out.stdout

    out = run_generated_tests()
    assert "3 failed" in out and "passed" not in out, out[-2000:]
    assert "NotImplementedError: demo_op: write the reference first" in out
    reference = folder / "reference.py"
    stub = reference.read_text()
    reference.write_text(stub.replace('raise NotImplementedError("demo_op: write the reference first")', "return (x.copy(),)"))
    out = run_generated_tests()
    assert "3 passed" in out and "failed" not in out, out[-2000:]  # decomposition (fp32, fp16) and kernel vs reference
    reference.write_text(stub.replace('raise NotImplementedError("demo_op: write the reference first")', "return (x * 2,)"))
    out = run_generated_tests()
    assert "3 failed" in out and "passed" not in out, out[-2000:]  # both bindings are compared with the reference
    assert main(["plugins", "new", "demo_op", "--root", str(tmp_path / "plugins")]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err


def _helpers_called_by_tests(folder: Path) -> set[str]:
    """Names of the functions that the test_* functions of the folder's test files call."""
    called = set()
    for f in folder.glob("test_*.py"):
        for fn in ast.walk(ast.parse(f.read_text())):
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_"):
                called |= {c.func.id if isinstance(c.func, ast.Name) else getattr(c.func, "attr", "")
                           for c in ast.walk(fn) if isinstance(c, ast.Call)}
    return called


def test_list_shows_bindings_and_tests(capsys):
    """Each row against the plugin itself: its op, its rewrite, its test files, and a binding
    claimed tested only where a test function calls the helper that exercises it."""
    import plugins

    assert main(["plugins", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    found = plugins.available()
    assert set(rows) == set(found) and {"rmsnorm_residual", "sample"} <= set(rows)
    for name, r in rows.items():
        p, folder = found[name], ROOT / "plugins" / name
        assert r["op"] == f"kiln::{p.op_type}" and r["rewrite"] == ("yes" if p.rewrite else "no"), name
        assert r["tests"] == sorted(f.name for f in folder.glob("test_*.py")), name
        called = _helpers_called_by_tests(folder)
        assert r["onnxruntime"].endswith("tested vs reference") == ("run_decomposition" in called), name
        assert r["tensorrt"].endswith("engine built in CI") == ("build_engine" in called), name
        assert r["kernel"].endswith("interpreter-tested in CI") == (p.kernel is not None and "run_kernel" in called), name
        assert r["cpu"].endswith("tested vs reference in CI") == ((folder / "cpu.py").is_file() and "load" in called), name
    assert rows["rmsnorm_residual"]["op"] == "kiln::RmsNormResidual"
