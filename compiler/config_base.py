"""The base of every typed config kiln reads from YAML (recipes, their sections, workloads), and
the one reader of such a file.

A leaf module (pydantic and yaml): unknown keys are refused, so a misspelt field fails the file
instead of being ignored, and a parsed section is frozen.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from compiler.errors import KilnError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def load_mapping(path: Path, what: str, example: str) -> dict:
    """The YAML mapping in `path` (a `what`: recipe, workload); one-line KilnErrors naming the
    file and line for bad YAML, and `example` for a file that is not a mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise KilnError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})", "fix the YAML syntax") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"{what} {path} cannot be read ({e})", "pass a readable UTF-8 YAML file") from None
    if not isinstance(data, dict):
        raise KilnError(f"{path}: a {what} must be a YAML mapping", f"see {example} for the fields")
    return data


__all__ = ["StrictModel", "load_mapping"]
