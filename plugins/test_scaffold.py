"""`kiln plugins new` writes a complete plugin folder whose test fails until it is implemented;
`kiln plugins list` shows each plugin with its bindings; recipes refuse unknown plugins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from compiler.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_new_plugin_test_fails_until_implemented(tmp_path, capsys):
    shutil.copytree(ROOT / "plugins", tmp_path / "plugins", ignore=shutil.ignore_patterns("__pycache__"))
    assert main(["plugins", "new", "demo_op", "--root", str(tmp_path / "plugins")]) == 0
    folder = tmp_path / "plugins" / "demo_op"
    assert sorted(p.name for p in folder.iterdir()) == ["__init__.py", "decomposition.py", "kernel.py", "reference.py",
                                                         "schema.py", "test_demo_op.py"]
    assert "kiln::DemoOp" not in capsys.readouterr().err
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          "-c", os.devnull, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:]
    assert "NotImplementedError: demo_op: write the reference first" in out.stdout
    assert "3 failed" in out.stdout
    assert main(["plugins", "new", "demo_op", "--root", str(tmp_path / "plugins")]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err


def test_list_shows_bindings_and_tests(capsys):
    assert main(["plugins", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"rmsnorm_residual", "sample"} <= set(rows)
    r = rows["rmsnorm_residual"]
    assert r["op"] == "kiln::RmsNormResidual" and r["rewrite"] == "yes"
    assert r["tensorrt"] == "IPluginV3 via the parser, engine built in CI"
    assert r["kernel"] == "Triton, interpreter-tested in CI"
