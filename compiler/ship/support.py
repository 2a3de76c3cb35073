"""`kiln support`: architectures x backends x precisions, as their checks last found them.

The rows are the registry's architectures. Each cell of support_matrix.json (next to this file)
is written by `make support-matrix` (scripts/support_matrix.py), which builds a tiny random-weight
checkpoint of the architecture for that backend and precision and runs one named check on the
engine: parity with transformers (onnxruntime fp32), closeness to the fp32 engine (quantised),
a plan header that lists its targets (TensorRT). A cell records its check, its status (passed,
failed or skipped: the check could not run on the machine that wrote the matrix) and why.
Nothing here is typed by hand, and no test writes the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from compiler.errors import KilnError

MATRIX_FILE = Path(__file__).with_name("support_matrix.json")
SCHEMA = 2
STATUSES = ("passed", "failed", "skipped")
_FIELDS = ("architecture", "backend", "precision", "check", "status", "detail")
_FIX = "regenerate it with `make support-matrix`"


def covered(path: Path | None = None) -> dict:
    """The matrix record {"generated": ..., "cells": [{architecture, backend, precision, check,
    status, detail, ...}, ...]}; an empty one when the file does not exist."""
    path = Path(path) if path is not None else MATRIX_FILE
    if not path.is_file():
        return {"generated": None, "cells": []}
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KilnError(f"{path} is not readable JSON ({str(e).splitlines()[0]})", _FIX) from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA or not isinstance(record.get("cells"), list):
        raise KilnError(f"{path} is not a schema-{SCHEMA} support matrix (per-cell check and status)", _FIX)
    for cell in record["cells"]:
        if not isinstance(cell, dict) or any(not isinstance(cell.get(k), str) for k in _FIELDS) \
                or cell["status"] not in STATUSES:
            raise KilnError(f"{path}: a cell without {', '.join(_FIELDS)} (status one of {', '.join(STATUSES)}): "
                            f"{json.dumps(cell)[:120]}", _FIX)
    return record


def table(path: Path | None = None) -> dict:
    """{"generated", "columns": ["backend/precision", ...], "rows": {architecture: {column: cell}}}:
    every registry architecture has a row (empty where no cell was checked)."""
    from compiler.frontend.models import REGISTRY

    record = covered(path)
    cells = record["cells"]
    columns = sorted({f"{c['backend']}/{c['precision']}" for c in cells})
    rows: dict[str, dict] = {arch: {} for arch in sorted(set(REGISTRY) | {c["architecture"] for c in cells})}
    for c in cells:
        rows[c["architecture"]][f"{c['backend']}/{c['precision']}"] = {k: c[k] for k in ("check", "status", "detail")}
    return {"generated": record["generated"], "columns": columns, "rows": rows}


def text(t: dict) -> str:
    """One row per architecture, one column per backend listing its checked precisions (a failed
    or skipped one marked so); then the reason of every cell that did not pass."""
    backends = sorted({c.split("/", 1)[0] for c in t["columns"]})
    mark = {"passed": "", "failed": " (FAILED)", "skipped": " (skipped)"}
    cells = {arch: {be: [f"{col.split('/', 1)[1]}{mark[cell['status']]}" for col, cell in sorted(row.items())
                         if col.startswith(be + "/")] for be in backends}
             for arch, row in t["rows"].items()}
    widths = {be: max([len(be)] + [len(", ".join(v[be])) for v in cells.values()]) for be in backends}
    aw = max([len("architecture")] + [len(a) for a in cells])
    lines = ["  ".join(["architecture".ljust(aw)] + [be.ljust(widths[be]) for be in backends])]
    lines.append("  ".join(["-" * aw] + ["-" * widths[be] for be in backends]))
    for arch, row in cells.items():
        lines.append("  ".join([arch.ljust(aw)] + [(", ".join(row[be]) or "-").ljust(widths[be]) for be in backends]))
    when = t["generated"] or "never (run `make support-matrix`)"
    lines.append(f"a precision listed plainly passed its check in `make support-matrix` ({when}); (FAILED) and (skipped) "
                 "did not, reasons below; float32+X = quantised with X")
    checks = sorted({cell["check"] for row in t["rows"].values() for cell in row.values()})
    if checks:
        lines.append(f"checks (scripts/support_matrix.py): {', '.join(checks)}; a TensorRT engine is built and its plan "
                     "read, not run (GPU-marked tests run engines where a GPU is present)")
    for arch, row in t["rows"].items():
        for col, cell in sorted(row.items()):
            if cell["status"] != "passed":
                lines.append(f"  {arch} {col} [{cell['check']}] {cell['status']}: {cell['detail']}")
    return "\n".join(line.rstrip() for line in lines)
