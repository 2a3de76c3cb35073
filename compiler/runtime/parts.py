"""Running the ONNX Runtime parts of a cut engine graph over a dict of named values.

A cut engine (backends/onnxruntime/partition.py) is a list of steps: graph parts, each an ONNX
Runtime session, with kiln ops between them (collectives of a multi-rank engine, kiln's attention
kernel). A part reads its inputs from the values so far and adds its outputs to them; caches a
part reads and writes in place stay bound to their buffers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def open_parts(engine_dir: Path, steps: list[dict], so: ort.SessionOptions) -> dict[str, ort.InferenceSession]:
    return {s["part"]: ort.InferenceSession(str(engine_dir / s["part"]), so, providers=["CPUExecutionProvider"])
            for s in steps if "part" in s}


def run_part(session: ort.InferenceSession, io: ort.IOBinding, step: dict, env: dict[str, np.ndarray],
             caches: list[tuple[str, ort.OrtValue]] = (), skip: frozenset[str] = frozenset()) -> None:
    """Run one part: inputs from env (those bound to caches already are left alone), the caches'
    present outputs bound to their buffers, every other output (but `skip`) read into env."""
    bound = {name.replace("present_", "past_") for name, _ in caches}
    for name in step["inputs"]:
        if name not in bound:
            io.bind_cpu_input(name, env[name])
    io.clear_binding_outputs()
    for name, buf in caches:
        io.bind_ortvalue_output(name, buf)
    present = {name for name, _ in caches}
    wanted = [n for n in step["outputs"] if n not in present and n not in skip]
    for name in wanted:
        io.bind_output(name)
    session.run_with_iobinding(io)
    values = io.get_outputs()  # in binding order: the caches, then `wanted`
    for name, v in zip(wanted, values[len(caches):]):
        env[name] = v.numpy()
