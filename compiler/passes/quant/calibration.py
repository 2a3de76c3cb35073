"""Calibration: statistics of the activations entering each linear layer, for the quantizers.

AWQ, SmoothQuant and static FP8 scales need, per MatMul with a constant weight W [K, N], the
input X [.., K] over a calibration set: mean |x| and max |x| per input channel, the per-tensor
max, and a few token rows of X for their loss. `collect()` runs the decoder graph part by part
so peak memory stays near one decoder layer's weights plus the hidden states of the set:

  prologue   nodes outside the layers that the layers read (inputs: mask, write index; embed)
  layer i    the nodes whose `kiln.layer` (compiler/ir/meta.py) is i
  epilogue   the rest (select, norm, lm_head), so lm_head's input is calibrated too

Each part becomes a standalone ONNX model with cloned nodes: its inputs are the graph inputs
and boundary values it reads from earlier parts, plus its lazy (checkpoint) weights, which are
fed as inputs too; only small in-memory constants are embedded. So the checkpoint is read for
one part at a time, the serialised model is tiny (no 2 GiB protobuf limit), and the weights are
held once. Its outputs are the values later parts read and the inputs of its target MatMuls;
nodes that neither needs (the KV cache outputs, the logits) are left out. Each part runs in
ONNX Runtime (CPU, 2 threads, basic optimisation) one sample at a time, batch 1, with
position_ids = arange(S), every position selected for the epilogue, and zero KV caches.

The caller builds the graph with max_seq = cfg.seq_len (the static cache then is no longer than
the samples), runs the quantizers' passes (merge_qkv, merge_gate_up, ...) and then calls
`collect()`, whose keys are the MatMul node names of that graph, e.g. `/layers.3/attn/qkv_proj/MatMul`,
or "value:" + a value's name for the statistics of any value a node computes (pruning's block
influence reads the residual stream that way: passes/prune.py). Every target of one run keeps
the same token rows, so rows of two targets can be compared row by row.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir

from compiler.errors import KilnError
from compiler.ir import meta

EVAL_TOKENS = 2048 + 1  # `kiln eval`'s default window + 1 targets: calibration starts after them
_EMBED_BYTES = 1 << 20  # in-memory constants up to this size are embedded; larger ones are fed
VALUE = "value:"  # a target "value:<name>" collects the statistics of that value itself, not of a MatMul input


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "stdlib"  # "stdlib": the pydoc topics shipped with Python; else a UTF-8 text file
    samples: int = 16
    seq_len: int = 512
    keep_rows: int = 256  # token rows of X kept per linear for the quantizers' loss
    seed: int = 0  # picks those rows


def _text(source: str) -> str:
    if source == "stdlib":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    path = Path(source)
    if not path.is_file():
        raise KilnError(f"calibration text {path} does not exist", "pass an existing UTF-8 text file, or 'stdlib'")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KilnError(f"calibration text {path} is not valid UTF-8", "pass a UTF-8 text file, or 'stdlib'") from None


def calibration_tokens(tokenizer_json: Path, cfg: CalibrationConfig) -> np.ndarray:
    """[samples, seq_len] int64: consecutive windows of the text after the first 2049 tokens
    (the `kiln eval` window), so calibration and evaluation text stay disjoint."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(_text(cfg.source)).ids  # as `kiln eval` encodes
    need = EVAL_TOKENS + cfg.samples * cfg.seq_len
    if len(ids) < need:
        raise KilnError(f"the calibration text has {len(ids)} tokens, fewer than {EVAL_TOKENS} (evaluation) + "
                        f"{cfg.samples} x {cfg.seq_len}", "pass a longer text, or fewer samples or a shorter seq_len")
    return np.asarray(ids[EVAL_TOKENS:need], dtype=np.int64).reshape(cfg.samples, cfg.seq_len)


@dataclass
class ActStats:
    mean_abs: np.ndarray  # [K] float64, mean |x| per input channel
    absmax: np.ndarray  # [K] float32, max |x| per input channel
    max_abs: float  # max |x| over the tensor
    # [min(keep_rows, count), K] float32, the same token rows (seeded) for every linear; or what
    # reads them from disk (calibration spills each layer's rows as it completes: see _Spill)
    rows_data: np.ndarray | Callable[[], np.ndarray]
    count: int  # token rows seen

    @property
    def rows(self) -> np.ndarray:
        return self.rows_data() if callable(self.rows_data) else self.rows_data


class _Spill:
    """Calibration rows of every linear in an anonymous temp file (gone with the last reader),
    each read back on demand: what the build holds does not grow with the model's depth."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="kiln-calibration-")
        self.end = 0

    def put(self, arr: np.ndarray) -> Callable[[], np.ndarray]:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        at, shape, f = self.end, arr.shape, self.file
        os.pwrite(f.fileno(), arr.tobytes(), at)
        self.end += arr.nbytes

        def read(f=f) -> np.ndarray:  # the default argument keeps the file open while a reader lives
            return np.frombuffer(os.pread(f.fileno(), int(np.prod(shape)) * 4, at), dtype=np.float32).reshape(shape)

        return read


@dataclass
class _Acc:
    """Streaming statistics of one MatMul input."""

    pick: np.ndarray  # [R] global row indices to keep, sorted
    sum_abs: np.ndarray | None = None  # [K] float64
    absmax: np.ndarray | None = None  # [K] float32
    rows: np.ndarray | None = None  # [R, K] float32
    count: int = 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])  # [T, K]
        if self.sum_abs is None:
            k = x.shape[1]
            self.sum_abs, self.absmax = np.zeros(k), np.zeros(k, np.float32)
            self.rows = np.zeros((len(self.pick), k), np.float32)
        a = np.abs(x)
        self.sum_abs += a.sum(axis=0, dtype=np.float64)
        np.maximum(self.absmax, a.max(axis=0), out=self.absmax)
        lo, hi = np.searchsorted(self.pick, [self.count, self.count + len(x)])
        self.rows[lo:hi] = x[self.pick[lo:hi] - self.count]
        self.count += len(x)

    def stats(self, spill: "_Spill | None" = None) -> ActStats:
        rows = self.rows if spill is None else spill.put(self.rows)
        return ActStats(self.sum_abs / self.count, self.absmax, float(self.absmax.max()), rows, self.count)


@dataclass
class _Part:
    name: str
    nodes: list[ir.Node] = field(default_factory=list)  # the part's nodes, graph order
    needed: dict[str, ir.Value] = field(default_factory=dict)  # values to output, by name
    targets: dict[str, str] = field(default_factory=dict)  # MatMul name -> input name


def _default_targets(graph: ir.Graph) -> list[str]:
    return [n.name for n in graph if n.op_type == "MatMul" and n.inputs[1] is not None
            and n.inputs[1].const_value is not None]


def _target(t: str, by_name: dict[str, ir.Node], values: dict[str, ir.Value]) -> tuple[ir.Node, ir.Value]:
    """(the node whose part collects target t, the value whose statistics it takes)."""
    if t.startswith(VALUE):
        v = values.get(t[len(VALUE):])
        if v is None:
            raise KilnError(f"calibration target {t!r} names no value a node of the graph computes", "name a node output")
        return v.producer(), v
    node = by_name.get(t)
    if node is None or node.op_type != "MatMul":
        raise KilnError(f"calibration target {t!r} is not a MatMul of the graph", "name MatMul nodes of the passed graph")
    return node, node.inputs[0]


def _partition(graph: ir.Graph, targets: list[str]) -> list[_Part]:
    """Prologue, one part per layer, epilogue; each sliced to what it must output."""
    layer = {n: i for n in graph if (i := meta.layer_of(n)) is not None}
    pro: set[ir.Node] = set()
    stack = [v for n in layer for v in n.inputs if v is not None]
    while stack:  # non-layer ancestors of layer nodes
        p = stack.pop().producer()
        if p is not None and p not in layer and p not in pro:
            pro.add(p)
            stack.extend(v for v in p.inputs if v is not None)
    order = sorted(set(layer.values()))
    parts = [_Part("prologue"), *(_Part(f"layers.{i}") for i in order), _Part("epilogue")]
    index = {i: k + 1 for k, i in enumerate(order)}
    part_of = {n: 0 if n in pro else index[layer[n]] if n in layer else len(parts) - 1 for n in graph}
    by_name = {n.name: n for n in graph}
    values = {v.name: v for n in graph for v in n.outputs}
    for t in targets:
        node, x = _target(t, by_name, values)
        parts[part_of[node]].targets[t] = x.name
        if x.producer() is not None:
            parts[part_of[x.producer()]].needed[x.name] = x
    for k in range(len(parts) - 1, -1, -1):  # last part first: slices tell earlier parts what to output
        keep, stack = set(), [v.producer() for v in parts[k].needed.values()]
        while stack:
            n = stack.pop()
            if n is None or n in keep:
                continue
            if part_of[n] != k:
                raise KilnError(f"node {n.name} of {parts[part_of[n]].name} feeds {parts[k].name} out of order",
                                "calibrate a graph built by kiln's frontend")
            keep.add(n)
            for v in n.inputs:
                if v is None or v.producer() is None:
                    continue
                if part_of[v.producer()] == k:
                    stack.append(v.producer())
                elif part_of[v.producer()] > k:
                    raise KilnError(f"{parts[k].name} reads {v.name} from a later part", "calibrate a graph built by kiln's frontend")
                else:
                    parts[part_of[v.producer()]].needed[v.name] = v
        parts[k].nodes = [n for n in graph if n in keep]
    return [p for p in parts if p.nodes or p.targets]


def _submodel(model: ir.Model, part: _Part, env: dict[str, np.ndarray]) -> tuple[bytes, dict[str, np.ndarray]]:
    """The part as a serialised ONNX model with cloned nodes, and its weights to feed.

    env holds sample 0's value of every graph input and boundary value (for types and shapes)."""
    graph, clone, inputs, inits, weights = model.graph, {}, [], [], {}

    def outside(v: ir.Value) -> ir.Value:
        t = v.const_value
        if v.producer() is None and t is not None and v not in graph.inputs:
            if not isinstance(t, ir.LazyTensor) and t.nbytes <= _EMBED_BYTES:
                new = ir.Value(name=v.name, type=ir.TensorType(t.dtype), shape=ir.Shape(t.shape), const_value=t)
                inits.append(new)
                return new
            weights[v.name] = t.numpy()  # the checkpoint is read here, for this part only
            arr = weights[v.name]
        else:
            arr = env[v.name]
        new = ir.Value(name=v.name, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)), shape=ir.Shape(arr.shape))
        inputs.append(new)
        return new

    nodes = []
    for n in part.nodes:
        ins = [None if v is None else clone[v] if v in clone else clone.setdefault(v, outside(v)) for v in n.inputs]
        attrs = [ir.Attr(a.name, a.type, a.value) for a in n.attributes.values()]
        new = ir.Node(n.domain, n.op_type, ins, attributes=attrs, num_outputs=len(n.outputs), name=n.name,
                      overload=n.overload, version=n.version)
        for old, out in zip(n.outputs, new.outputs):
            out.name, out.type, out.shape = old.name, old.type, old.shape
            clone[old] = out
        nodes.append(new)
    outputs = [clone[v] for v in part.needed.values()]
    sub = ir.Graph(inputs, outputs, nodes=nodes, initializers=inits, opset_imports=dict(graph.opset_imports), name=part.name)
    proto = ir.to_proto(ir.Model(sub, ir_version=model.ir_version, producer_name="kiln-calibration"))
    return proto.SerializeToString(), weights


def _graph_feeds(graph: ir.Graph, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per sample: the decoder's graph inputs at batch 1 (zero caches, every position selected)."""
    n, s = tokens.shape
    pos = np.arange(s, dtype=np.int64)[None]  # [1, S]
    caches = {}
    for v in graph.inputs:
        if v.name.startswith("past_"):
            dims = [d if isinstance(d, int) else 1 for d in v.shape]  # [1, Nkv, M, D]
            if dims[2] < s:
                raise KilnError(f"the graph's max_seq {dims[2]} is below the calibration seq_len {s}",
                                f"build the graph with max_seq = {s}")
            caches[v.name] = np.zeros(dims, np.float32)
        elif v.name not in ("input_ids", "position_ids", "logits_positions"):
            raise KilnError(f"graph input {v.name} is not a decoder input calibration can feed", "calibrate a kiln decoder graph")
    return [{"input_ids": tokens[i:i + 1].astype(np.int64), "position_ids": pos, "logits_positions": pos, **caches}
            for i in range(n)]


@contextmanager
def _bar(progress: bool, total: int) -> Iterator:
    """Yield `tick(name)`; with progress=True a rich bar over the parts on stderr."""
    if not progress:
        yield lambda name: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("calibrating {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task("", total=total)
        yield lambda name: bar.update(task, advance=1, description=name)


def collect(model: ir.Model, tokens: np.ndarray, targets: list[str] | None = None, progress: bool = True,
            *, keep_rows: int = 256, seed: int = 0, threads: int = 2) -> dict[str, ActStats]:
    """Statistics of the input of each target MatMul (default: every MatMul with a constant
    weight), or of each "value:<name>", over tokens [N, S] int64, running the graph one part
    (layer) at a time.

    The graph is the decoder as built by the frontend with max_seq = S, after the passes."""
    import onnxruntime as ort

    from compiler.runtime.config import SessionConfig
    from compiler.runtime.session import session_options

    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 2 or tokens.size == 0:
        raise KilnError(f"calibration tokens have shape {list(tokens.shape)}", "pass [samples, seq_len] token ids")
    graph = model.graph
    targets = _default_targets(graph) if targets is None else list(targets)
    parts = _partition(graph, targets)
    per_sample = _graph_feeds(graph, tokens)  # [N] dicts: graph inputs, then boundary values
    reads = [{v.name for n in p.nodes for v in n.inputs if v is not None} | set(p.targets.values()) for p in parts]
    live = [set().union(*reads[k + 1:]) for k in range(len(parts))]  # names read after part k
    feeds0 = set(per_sample[0])  # the graph inputs (small) stay
    picks: dict[int, np.ndarray] = {}
    accs: dict[str, _Acc] = {}
    done: dict[str, ActStats] = {}
    spill = _Spill()
    so = session_options(SessionConfig(intra_op_threads=threads, inter_op_threads=1,
                                       graph_optimization_level="ORT_ENABLE_BASIC"))
    with _bar(progress, len(parts)) as tick:
        for k, part in enumerate(parts):
            data, weights = _submodel(model, part, per_sample[0])
            session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            outs = list(part.needed)
            for env in per_sample:
                got = dict(zip(outs, session.run(outs, {n: weights[n] if n in weights else env[n] for n in names})))
                for t, x in part.targets.items():
                    x = got[x] if x in got else env[x]  # [1, S, K]
                    total = len(tokens) * int(np.prod(x.shape[:-1]))
                    if total not in picks:
                        rng = np.random.default_rng(seed)
                        picks[total] = np.sort(rng.choice(total, size=min(keep_rows, total), replace=False))
                    accs.setdefault(t, _Acc(picks[total])).add(x)
                env.update({n: got[n] for n in outs if n in live[k]})  # [1, S, H] hidden, mask, ...
                for n in [n for n in env if n not in live[k] and n not in feeds0]:
                    del env[n]  # boundary values nobody reads any more
            for t in part.targets:  # complete: its rows go to disk, its accumulator away
                done[t] = accs.pop(t).stats(spill)
            del session, weights, data
            gc.collect()
            tick(part.name)
    return {t: done[t] for t in targets}

