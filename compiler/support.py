"""`kiln support`: architectures x backends x precisions, as the test suite last covered them.

The rows are the registry's architectures; a cell is marked when a test that built an engine of
that architecture, backend and precision passed in the last full `make test` run (recorded by
tests/conftest.py into support_matrix.json next to this file). Nothing here is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

MATRIX_FILE = Path(__file__).with_name("support_matrix.json")


def covered() -> dict:
    """{"generated": ..., "cells": [[arch, backend, precision], ...]} or an empty record."""
    if not MATRIX_FILE.is_file():
        return {"generated": None, "cells": []}
    return json.loads(MATRIX_FILE.read_text())


def table() -> dict:
    from compiler.frontend.models import REGISTRY

    record = covered()
    cells = {tuple(c) for c in record["cells"]}
    columns = sorted({(backend, precision) for _, backend, precision in cells})
    rows = {arch: [f"{b}/{p}" for b, p in columns if (arch, b, p) in cells] for arch in sorted(REGISTRY)}
    return {"generated": record["generated"], "columns": [f"{b}/{p}" for b, p in columns], "rows": rows}


def text(t: dict) -> str:
    """One row per architecture, one column per backend listing the covered precisions."""
    backends = sorted({c.split("/", 1)[0] for c in t["columns"]})
    cells = {arch: {be: [c.split("/", 1)[1] for c in have if c.startswith(be + "/")] for be in backends}
             for arch, have in t["rows"].items()}
    widths = {be: max([len(be)] + [len(", ".join(v[be])) for v in cells.values()]) for be in backends}
    aw = max([len("architecture")] + [len(a) for a in cells])
    lines = ["  ".join(["architecture".ljust(aw)] + [be.ljust(widths[be]) for be in backends])]
    lines.append("  ".join(["-" * aw] + ["-" * widths[be] for be in backends]))
    for arch, row in cells.items():
        lines.append("  ".join([arch.ljust(aw)] + [(", ".join(row[be]) or "-").ljust(widths[be]) for be in backends]))
    when = t["generated"] or "never (run `make test`)"
    lines.append(f"precisions with a passing test in the last full test run ({when}); float32+X = quantised with X")
    lines.append("tensorrt and onnxruntime-cuda cells are engines built and checked on CPU; running them is tested only "
                 "by GPU-marked tests, which run where a GPU is present")
    return "\n".join(line.rstrip() for line in lines)
