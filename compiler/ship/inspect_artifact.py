"""`kiln inspect`: an artifact's manifest and a summary of its graph (op counts, weight bytes),
or for a TensorRT engine, its plan header (size, TensorRT version, compute-capability targets).

The graph is loaded with onnx_ir, whose external tensors stay on disk: no weights are loaded. A
TensorRT plan is not deserialised (that needs a GPU): only its 64-byte header is read.
The artifact is verified against its kiln.json first: a tampered one is refused in one line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path

import onnx_ir as ir

from compiler.errors import KilnError
from compiler.ir.builder import initializer_bytes
from compiler.runtime.manifest import read_engine
from compiler.runtime.verify import verified


def inspect_artifact(path: Path) -> dict:
    """The manifest, a graph (or plan) summary and its text; the artifact is verified first."""
    if not (path / "kiln.json").is_file():
        raise KilnError(f"{path} is not a kiln artifact (no kiln.json)", "pass a directory written by `kiln build`")
    manifest = verified(path, "the artifact fails verification: ")  # the refusal names the file and the fix
    engine = asdict(read_engine(path))  # checked on the way (a malformed engine.json names its problem)
    if engine["backend"] == "tensorrt":
        return _inspect_plan(path, manifest, engine)
    model = ir.load(path / engine["model_file"])
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.all_nodes())
    weights = {v.const_value.dtype.name for v in model.graph.initializers.values() if v.const_value is not None}
    weight_bytes = initializer_bytes(model.graph)
    summary = {"nodes": sum(ops.values()), "ops": dict(ops.most_common()), "initializers": len(model.graph.initializers),
               "weight_bytes": weight_bytes, "weight_dtypes": sorted(weights)}
    return {"manifest": manifest, "graph": summary, "text": _text(manifest, engine, summary)}


def _inspect_plan(path: Path, manifest: dict, engine: dict) -> dict:
    from compiler.runtime.plan import read_plan_header

    try:
        h = read_plan_header(path / engine["model_file"])
    except ValueError as e:
        raise KilnError(f"{path / engine['model_file']}: {e}", "rebuild the artifact with `kiln build`") from None
    plan = {"plan_bytes": h.size, "tensorrt_version": h.version, "targets": h.targets}
    lines = _text(manifest, engine, None).splitlines()
    lines.insert(4, f"plan       {engine['model_file']}: {h.size / 1e6:.1f} MB, TensorRT {h.version}, targets {', '.join(h.targets)}"
                    f", {engine['tensorrt']['precision']}")
    return {"manifest": manifest, "plan": plan, "text": "\n".join(lines)}


def _text(m: dict, engine: dict, g: dict | None) -> str:
    b, src = m["build"], m["source"]
    lines = [
        f"artifact   {m['name']}  (kiln {m['kiln_version']})",
        f"source     {src['path']}  [{src['architecture']}]  {src['digest'][:23]}...",
        f"backend    {m['backend']['name']} {m['backend']['version']}, graph {m['backend']['graph']}",
        f"limits     max_batch {engine['max_batch']}, max_seq {engine['max_seq']}, "
        + (f"KV cache {engine['kv_cache']['layout']}" if engine.get("kv_cache") else f"task {engine.get('task')}"),
        f"built      {b['finished']} on {b['host']} in {b['seconds']} s, peak RSS {b['peak_rss_bytes'] / 2**30:.2f} GiB",
        *([] if g is None else [
            f"graph      {g['nodes']} nodes, {g['initializers']} initializers, {g['weight_bytes'] / 1e6:.1f} MB weights ({', '.join(g['weight_dtypes'])})",
            "ops        " + ", ".join(f"{k} {v}" for k, v in g["ops"].items())]),
        "inputs     " + ", ".join(f"{t['name']}{t['shape']}" for t in engine["inputs"][:4]) + (" ..." if len(engine["inputs"]) > 4 else ""),
        *_parallel_lines(m.get("parallel")),
        "files      " + _files(m["files"]),
    ]
    return "\n".join(lines)


def _parallel_lines(p: dict | None) -> list[str]:
    if not p:
        return []
    head = f"ranks      tp={p['tp']} x pp={p['pp']} = {p['world_size']}; single-rank weights {p['weight_bytes_single_rank'] / 1e6:.1f} MB"
    return [head] + [f"  rank {r['rank']}  stage {r['stage']} tp_rank {r['tp_rank']}  layers {r['layers'][0]}..{r['layers'][1] - 1}  "
                     f"{r['weight_bytes'] / 1e6:.1f} MB weights ({r['replicated_bytes'] / 1e6:.1f} MB replicated)" for r in p["ranks"]]


def _files(files) -> str:
    """File names, with the ONNX Runtime rank parts counted rather than listed."""
    parts = [f for f in files if ".part" in f]
    rest = sorted(f for f in files if ".part" not in f)
    return ", ".join(rest) + (f", and {len(parts)} rank{{r}}.part{{k}}.onnx files" if parts else "")
