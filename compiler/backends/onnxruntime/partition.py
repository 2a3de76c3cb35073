"""Cut a graph at its kiln ops into parts ONNX Runtime can run.

ONNX Runtime has no kernels for the kiln domain, so `rank{r}.onnx` (a rank graph, with its
`kiln::AllReduce` nodes) is cut into `rank{r}.part{k}.onnx`, and `model.onnx` with its
`kiln::PagedAttention` nodes into `model.part{k}.onnx`: maximal runs of standard nodes, in
topological order. Between two parts the runtime performs the collective with torch.distributed,
or runs kiln's attention kernel over the KV rows it owns (runtime/kernel_session.py). A part's
inputs are the graph inputs and earlier values it reads; its outputs are what later parts, kiln
ops or the graph outputs read. Parts are written from the saved graph's protobuf, whose
initializers refer to its data file (`rank{r}.onnx.data`, `model.onnx.data`): every part shares
that one weights file (no copies), and the cut never loads a weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

DOMAIN = "kiln"
KERNELS = ("PagedAttention",)  # kiln ops the runtime runs itself; the other kiln ops are collectives


@dataclass
class Part:
    nodes: list = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def steps(graph: onnx.GraphProto) -> list[Part | onnx.NodeProto]:
    """Parts and the collective nodes between them, in execution order."""
    out: list[Part | onnx.NodeProto] = [Part()]
    for node in graph.node:
        if node.domain == DOMAIN:
            out += [node, Part()]
        else:
            out[-1].nodes.append(node)
    out = [s for s in out if not isinstance(s, Part) or s.nodes]
    inits = {t.name for t in graph.initializer}
    graph_outputs = {v.name for v in graph.output}
    for i, s in enumerate(out):
        if not isinstance(s, Part):
            continue
        made = {o for n in s.nodes for o in n.output}
        later = {x for t in out[i + 1:] for x in (_inputs_of(t))} | graph_outputs
        s.inputs = _unique(x for n in s.nodes for x in n.input if x and x not in made and x not in inits)
        s.outputs = _unique(o for n in s.nodes for o in n.output if o in later)
    return out


def _inputs_of(step) -> list[str]:
    return [x for n in step.nodes for x in n.input] if isinstance(step, Part) else list(step.input)


def _unique(names) -> list[str]:
    return list(dict.fromkeys(names))


def write_parts(rank_model: Path, prefix: str) -> list[dict]:
    """Write each part beside rank_model as `{prefix}.part{k}.onnx`; returns the step records
    for engine.json: {"part": file, "inputs", "outputs"}, {"collective": op, "input", "output", ...}
    or {"kernel": op, "inputs", "outputs", ...its attributes}."""
    model = onnx.load(str(rank_model), load_external_data=False)
    # types of values that legalisation added after the passes' shape inference (int32 lengths, ...)
    typed = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = model.graph
    known = {v.name for v in [*g.input, *g.output, *g.value_info]}
    g.value_info.extend(v for v in typed.graph.value_info if v.name not in known)
    infos = {v.name: v for v in [*g.input, *g.output, *g.value_info]}
    inits = {t.name: t for t in g.initializer}
    opsets = [o for o in model.opset_import if o.domain != DOMAIN]
    records, k = [], 0
    for s in steps(g):
        if not isinstance(s, Part):
            if s.input[0] in infos and s.output[0] not in infos:  # same type and shape as its input
                info = onnx.ValueInfoProto()
                info.CopyFrom(infos[s.input[0]])
                info.name = s.output[0]
                infos[info.name] = info
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in s.attribute}
            attrs = {a: (v.decode() if isinstance(v, bytes) else v) for a, v in attrs.items()}
            if s.op_type in KERNELS:
                records.append({"kernel": s.op_type, "inputs": list(s.input), "outputs": list(s.output), **attrs})
            else:
                records.append({"collective": s.op_type, "input": s.input[0], "output": s.output[0], **attrs})
            continue
        used = {x for n in s.nodes for x in n.input}
        part = onnx.helper.make_graph(
            s.nodes, f"{g.name}_part{k}", [_info(infos, x) for x in s.inputs], [_info(infos, x) for x in s.outputs],
            initializer=[inits[x] for x in inits if x in used])
        pm = onnx.helper.make_model(part, opset_imports=opsets, ir_version=model.ir_version, producer_name="kiln")
        name = f"{prefix}.part{k}.onnx"
        onnx.save(pm, str(rank_model.parent / name))
        records.append({"part": name, "inputs": s.inputs, "outputs": s.outputs})
        k += 1
    return records


def _info(infos: dict, name: str) -> onnx.ValueInfoProto:
    """The value's type from shape inference (dims kept), or a float tensor of unknown shape."""
    if name in infos:
        return infos[name]
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
