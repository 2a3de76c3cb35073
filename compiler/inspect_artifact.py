"""`kiln inspect`: an artifact's manifest and a summary of its graph (op counts, weight bytes).

The graph is loaded with onnx_ir, whose external tensors stay on disk: no weights are read.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx_ir as ir

from compiler.errors import KilnError


def inspect_artifact(path: Path) -> dict:
    manifest_path = path / "kiln.json"
    if not manifest_path.is_file():
        raise KilnError(f"{path} is not a kiln artifact (no kiln.json)", "pass a directory written by `kiln build`")
    manifest = json.loads(manifest_path.read_text())
    engine = json.loads((path / "engine.json").read_text())
    model = ir.load(path / engine["model_file"])
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.all_nodes())
    weights = {v.const_value.dtype.name for v in model.graph.initializers.values() if v.const_value is not None}
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    summary = {"nodes": sum(ops.values()), "ops": dict(ops.most_common()), "initializers": len(model.graph.initializers),
               "weight_bytes": weight_bytes, "weight_dtypes": sorted(weights)}
    return {"manifest": manifest, "graph": summary, "text": _text(manifest, engine, summary)}


def _text(m: dict, engine: dict, g: dict) -> str:
    b, src = m["build"], m["source"]
    lines = [
        f"artifact   {m['name']}  (kiln {m['kiln_version']})",
        f"source     {src['path']}  [{src['architecture']}]  {src['digest'][:23]}...",
        f"backend    {m['backend']['name']} {m['backend']['version']}, graph {m['backend']['graph']}",
        f"limits     max_batch {engine['max_batch']}, max_seq {engine['max_seq']}, KV cache {engine['kv_cache']['layout']}",
        f"built      {b['finished']} on {b['host']} in {b['seconds']} s, peak RSS {b['peak_rss_bytes'] / 2**30:.2f} GiB",
        f"graph      {g['nodes']} nodes, {g['initializers']} initializers, {g['weight_bytes'] / 1e6:.1f} MB weights ({', '.join(g['weight_dtypes'])})",
        "ops        " + ", ".join(f"{k} {v}" for k, v in g["ops"].items()),
        "inputs     " + ", ".join(f"{t['name']}{t['shape']}" for t in engine["inputs"][:4]) + (" ..." if len(engine["inputs"]) > 4 else ""),
        "files      " + ", ".join(sorted(m["files"])),
    ]
    return "\n".join(lines)
