"""kiln plugins: one folder per custom op (schema, reference, decomposition, kernel, bindings, tests).

`available()` finds every `plugins/<name>/` that defines `PLUGIN` (in its __init__, or in its
plugin.py when the package has pieces the runtime imports alone); `kiln plugins new NAME`
scaffolds a new one, `kiln plugins list` shows them. A recipe's `plugins: [name, ...]` runs each
plugin's rewrite pass; a backend that cannot bind the op gets its decomposition instead, and the
build log and kiln.json say so.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def available() -> dict:
    """name -> Plugin, for every plugin folder."""
    found = {}
    for mod in pkgutil.iter_modules([str(ROOT)]):
        if mod.ispkg:
            where = f"plugins.{mod.name}.plugin" if (ROOT / mod.name / "plugin.py").is_file() else f"plugins.{mod.name}"
            plugin = getattr(importlib.import_module(where), "PLUGIN", None)
            if plugin is not None:
                found[plugin.name] = plugin
    return dict(sorted(found.items()))


def get(name: str):
    plugins = available()
    if name not in plugins:
        raise KeyError(f"unknown plugin {name!r} (available: {', '.join(plugins) or 'none'})")
    return plugins[name]
