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
    cols = t["columns"]
    width = max(len(a) for a in t["rows"]) if t["rows"] else 10
    head = " " * width + "  " + "  ".join(cols)
    lines = [head, "-" * len(head)]
    for arch, have in t["rows"].items():
        marks = "  ".join(("x" if c in have else "-").center(len(c)) for c in cols)
        lines.append(f"{arch.ljust(width)}  {marks}")
    when = t["generated"] or "never (run `make test`)"
    lines.append(f"x = covered by a passing test; recorded by the test run of {when}")
    return "\n".join(lines)
