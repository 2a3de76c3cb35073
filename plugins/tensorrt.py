"""TensorRT binding of kiln plugins: a generic IPluginV3 (IPluginV3One core/build/runtime) and an
IPluginCreatorV3One per plugin, registered from Python. TensorRT reaches them through the ONNX
parser's plugin fallback: a `kiln` node with no importer is built by the creator registered
under its op type (TensorRT-RTX's Python network API has no add_plugin_v3).

Build time needs only the plugin's shape and type rules (OUTPUT_DIMS_FROM_INPUT / OUTPUT_DTYPES below); at run
time `enqueue` wraps TensorRT's device pointers as torch tensors and runs the Triton kernel on
TensorRT's stream (GPU only).

The parser dlopens an unversioned `libtensorrt_rtx.so` that the wheel does not ship, so
`build_engine()` runs the parser in a child process whose library path holds that link.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# per plugin op, per output: (the input whose dims it takes, the axes kept or None for all)
OUTPUT_DIMS_FROM_INPUT = {"RmsNormResidual": [(0, None), (0, None)], "Sample": [(0, (0,))], "KvAttention": [(0, None)], "RmsNormResidualInt8": [(0, None), (0, None)]}
# per plugin op, per output: "same" as input 0, or a TensorRT DataType name (default: all "same")
OUTPUT_DTYPES = {"RmsNormResidual": ["same", "same"], "RmsNormResidualInt8": ["int8", "same"], "Sample": ["int64"]}


def _plugin_class(trt, plugin):
    shapes = OUTPUT_DIMS_FROM_INPUT[plugin.op_type]
    dtypes = OUTPUT_DTYPES.get(plugin.op_type, ["same"] * len(plugin.outputs))

    class KilnPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, attrs: dict | None = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = plugin.op_type, "", "1"
            self.num_outputs = len(plugin.outputs)
            self.attrs = plugin.attributes(attrs)

        def get_capability_interface(self, _type):
            return self

        def clone(self):
            return KilnPlugin(dict(self.attrs))

        def get_output_data_types(self, input_types):
            return [input_types[0] if d == "same" else getattr(trt, d) for d in dtypes]

        def get_output_shapes(self, inputs, _shape_inputs, _expr_builder):
            out = []
            for src, axes in shapes:
                dims = trt.DimsExprs(inputs[src])
                if axes is not None:
                    kept = trt.DimsExprs(len(axes))
                    for i, a in enumerate(axes):
                        kept[i] = dims[a]
                    dims = kept
                out.append(dims)
            return out

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos < num_inputs:
                return desc.type in (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16, trt.DataType.INT64, trt.DataType.INT32)
            want = dtypes[pos - num_inputs]
            return desc.type == (in_out[0].desc.type if want == "same" else getattr(trt, want))

        def configure_plugin(self, _inputs, _outputs):
            pass

        def on_shape_change(self, _inputs, _outputs):
            pass

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([_field(trt, a, self.attrs[a.name]) for a in plugin.attrs])

        def set_tactic(self, _tactic):
            pass

        def attach_to_context(self, _context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, _workspace, stream):
            _enqueue(plugin, self.attrs, input_desc, output_desc, inputs, outputs, stream)

    return KilnPlugin


def _field(trt, attr, value):
    if attr.kind == "float":
        return trt.PluginField(attr.name, np.array([value], dtype=np.float32), trt.PluginFieldType.FLOAT32)
    if attr.kind == "int":
        return trt.PluginField(attr.name, np.array([value], dtype=np.int32), trt.PluginFieldType.INT32)
    return trt.PluginField(attr.name, np.frombuffer(str(value).encode(), dtype=np.int8), trt.PluginFieldType.CHAR)


def _enqueue(plugin, attrs, input_desc, output_desc, inputs, outputs, stream):  # GPU only
    import torch

    def tensor(ptr, desc):
        dtype = {0: np.float32, 1: np.float16, 3: np.int32, 8: np.int64}.get(int(desc.type), np.float32)
        shape = tuple(desc.dims)
        iface = {"shape": shape, "typestr": np.dtype(dtype).str, "data": (int(ptr), False), "version": 3}
        return torch.as_tensor(type("Dev", (), {"__cuda_array_interface__": iface})(), device="cuda")

    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        results = plugin.run_kernel(*[tensor(p, d) for p, d in zip(inputs, input_desc)], **attrs)
        for out, res in zip([tensor(p, d) for p, d in zip(outputs, output_desc)], results):
            out.copy_(res.to(out.dtype))


def register(trt, plugin) -> object:
    """Register the plugin's IPluginCreatorV3One with TensorRT's registry; returns the creator
    (keep a reference: the registry does not own Python objects)."""
    cls = _plugin_class(trt, plugin)

    class KilnPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = plugin.op_type, "", "1"
            self.field_names = trt.PluginFieldCollection([_field(trt, a, a.default) for a in plugin.attrs])

        def create_plugin(self, _name, fields, _phase):
            attrs = {}
            for f in fields:
                a = next((x for x in plugin.attrs if x.name == f.name), None)
                if a is not None:
                    raw = np.asarray(f.data)
                    attrs[a.name] = float(raw[0]) if a.kind == "float" else int(raw[0]) if a.kind == "int" else raw.tobytes().decode()
            return cls(attrs)

    creator = KilnPluginCreator()
    trt.get_plugin_registry().register_creator(creator, "")
    return creator


def build_engine(model: Path, out: Path, plugins: list[str], targets: tuple[str, ...] = ("SM80",)) -> dict:
    """Parse model (ONNX with kiln plugin nodes) and build a TensorRT-RTX engine at out, in a child
    process; returns its record: layers seen by the parser, plugin layers, build log errors."""
    import tensorrt_rtx_libs

    libdir = Path(tensorrt_rtx_libs.__file__).parent
    links = Path(tempfile.mkdtemp(prefix="kiln-trt-libs-"))
    for name in ("libtensorrt_rtx.so", "libtensorrt_onnxparser_rtx.so"):
        (links / name).symlink_to(libdir / f"{name}.1")
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(filter(None, [str(links), str(libdir), os.environ.get("LD_LIBRARY_PATH")]))}
    args = json.dumps({"model": str(model), "out": str(out), "plugins": plugins, "targets": list(targets)})
    proc = subprocess.run([sys.executable, "-m", "plugins.tensorrt", args], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"TensorRT plugin build failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(args: dict) -> dict:
    import tensorrt_rtx as trt

    import plugins as kp

    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines = []

        def log(self, severity, msg):
            self.lines.append(f"[{severity.name}] {msg}")

    log = Log()
    creators = [register(trt, kp.get(n)) for n in args["plugins"]]  # noqa: F841 (kept alive for the build)
    builder = trt.Builder(log)
    net = builder.create_network(0)
    parser = trt.OnnxParser(net, log)
    if not parser.parse_from_file(args["model"]):
        return {"ok": False, "errors": [str(parser.get_error(i)) for i in range(parser.num_errors)]}
    layers = [net.get_layer(i) for i in range(net.num_layers)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()  # dynamic dims: 1 .. 64 (these are op-level test engines)
    for i in range(net.num_inputs):
        t = net.get_input(i)
        dims = list(t.shape)
        if any(d < 0 for d in dims):
            profile.set_shape(t.name, *[[d if d >= 0 else v for d in dims] for v in (1, 8, 64)])
    config.add_optimization_profile(profile)
    config.num_compute_capabilities = len(args["targets"])
    for i, t in enumerate(args["targets"]):
        config.set_compute_capability(getattr(trt.ComputeCapability, t), i)
    plan = builder.build_serialized_network(net, config)
    if plan is not None:
        Path(args["out"]).write_bytes(memoryview(plan))
    consumed = {layer.get_input(i).name for layer in layers for i in range(layer.num_inputs)
                if layer.get_input(i) is not None and layer.get_input(i).is_network_input}
    return {"ok": plan is not None, "layers": [str(layer.type).split(".")[-1] for layer in layers],
            "inputs_used": sorted(consumed),
            "plugin_layers": [layer.name for layer in layers if "PLUGIN" in str(layer.type)],
            "errors": [line for line in log.lines if line.startswith(("[ERROR]", "[INTERNAL_ERROR]"))][-5:],
            "bytes": plan.nbytes if plan is not None else 0}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
