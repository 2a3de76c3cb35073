"""What a plugin is: one custom op in the `kiln` ONNX domain, with everything each backend needs.

A plugin folder (`plugins/<name>/`) exposes `PLUGIN = Plugin(...)` built from its own files:
  schema         inputs, outputs, attributes and `infer` (output dtypes and shapes)
  reference      numpy: the definition of the op's numerics
  decomposition  an ONNX function in standard ops: ONNX Runtime, and any backend without the
                 kernel, runs the op through it
  kernel         a Triton kernel (torch tensors in, torch tensors out); CPU tests run it
                 under TRITON_INTERPRET=1
  rewrite        optional: the pass that puts the op into kiln's graphs (pattern + check)
TensorRT reaches the op through the ONNX parser's plugin fallback (plugins/tensorrt.py builds a
generic IPluginV3 from this description); the network-API backend cannot add IPluginV3 layers in
TensorRT-RTX's Python API, so there the op falls back to its decomposition, with a warning.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import onnx
from onnx import helper

DOMAIN = "kiln"
OPSET = 24


@dataclass(frozen=True)
class Attr:
    name: str
    kind: Literal["int", "float", "string"]
    default: int | float | str
    doc: str = ""


@dataclass(frozen=True)
class Port:
    name: str
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class Plugin:
    name: str  # folder name
    op_type: str  # op in the kiln domain
    doc: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    attrs: tuple[Attr, ...]
    # (input element types as onnx.TensorProto enums, input shapes, attrs) -> [(type, shape)] per output;
    # shapes may hold str dims; a rule that is broken raises ValueError naming it
    infer: Callable[[list, list, dict], list[tuple]]
    reference: Callable[..., tuple[np.ndarray, ...]]
    decomposition: Callable[[], list[onnx.NodeProto]]  # nodes over the op's input/output names (attrs by ref_attr)
    # "module:name" references, imported on first use (triton and the compiler's passes are heavy):
    kernel: str | None = None  # the Triton launcher: torch tensors in -> torch tensors out
    rewrite: str | None = None  # the Pass class that introduces the op into kiln graphs
    bandwidth_bound: bool = True  # the GPU table compares against bytes moved
    engine_io: bool = False  # the rewrite adds engine inputs/outputs that the runtime must drive
    tested: dict = field(default_factory=dict)  # how each binding is tested, for `kiln plugins list`

    def run_kernel(self, *tensors, **attrs) -> tuple:
        return _resolve(self.kernel)(*tensors, **attrs)

    def make_rewrite(self):
        return _resolve(self.rewrite)()

    def attributes(self, given: dict | None = None) -> dict:
        """The op's attributes with defaults filled in; an unknown one is refused by name."""
        given = dict(given or {})
        unknown = set(given) - {a.name for a in self.attrs}
        if unknown:
            raise ValueError(f"plugin {self.name}: unknown attribute {sorted(unknown)[0]!r}")
        return {a.name: given.get(a.name, a.default) for a in self.attrs}

    def function(self) -> onnx.FunctionProto:
        """The decomposition as a model-local ONNX function `kiln::<op_type>`; its nodes take the
        op's attributes by reference (ref_attr_name), defaults declared here."""
        defaults = [helper.make_attribute(a.name, a.default) for a in self.attrs]
        fn = helper.make_function(DOMAIN, self.op_type, [p.name for p in self.inputs], [p.name for p in self.outputs],
                                  self.decomposition(), [helper.make_opsetid("", OPSET)])
        fn.attribute_proto.extend(defaults)
        return fn

    def node(self, inputs: list[str], outputs: list[str], name: str, attrs: dict | None = None) -> onnx.NodeProto:
        return helper.make_node(self.op_type, inputs, outputs, name=name, domain=DOMAIN, **self.attributes(attrs))

    def model(self, input_types: list[tuple[int, list]], attrs: dict | None = None, with_function: bool = True) -> onnx.ModelProto:
        """A one-node model of the op with its decomposition attached: what the ONNX Runtime
        tests run and what TensorRT's parser reads (input_types: (TensorProto dtype, shape))."""
        ins = [helper.make_tensor_value_info(p.name, t, s) for p, (t, s) in zip(self.inputs, input_types)]
        inferred = self.infer([t for t, _ in input_types], [list(s) for _, s in input_types], self.attributes(attrs))
        outs = [helper.make_tensor_value_info(p.name, t, s) for p, (t, s) in zip(self.outputs, inferred)]
        graph = helper.make_graph([self.node([p.name for p in self.inputs], [p.name for p in self.outputs], self.op_type, attrs)],
                                  self.name, ins, outs)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                                 functions=[self.function()] if with_function else [], ir_version=10)


def _resolve(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def ref_attr(name: str, kind: str) -> onnx.AttributeProto:
    """An attribute of a decomposition node that takes the op's attribute `name`."""
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name = name, name
    a.type = {"int": onnx.AttributeProto.INT, "float": onnx.AttributeProto.FLOAT, "string": onnx.AttributeProto.STRING}[kind]
    return a
