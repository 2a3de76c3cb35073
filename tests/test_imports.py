"""The import graph of compiler/ and plugins/, read from the source (imports at any depth, lazy
ones included): no module may reach itself through imports, and compiler/runtime may import
only itself, compiler.errors, the standard library and what a server has (numpy, onnxruntime,
tokenizers; tensorrt, and torch for multi-rank and TensorRT sessions, inside functions), so
engines load without the build side."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_PACKAGES = {"numpy", "onnxruntime", "tokenizers", "tensorrt", "tensorrt_rtx", "jinja2"}
# torch only where a runtime needs it: gloo collectives of multi-rank CPU engines, CUDA buffers of TensorRT
TORCH_USERS = {"compiler.runtime.distributed", "compiler.runtime.tensorrt_session"}
# llguidance only in the grammar module, imported on a structured request's first use (kiln[serve])
OPTIONAL = {"compiler.runtime.grammar": {"llguidance"}}
# plugin pieces a runtime session runs itself (kiln's CPU attention kernel): numpy and the standard library only
RUNTIME_PLUGINS = {"plugins", "plugins.paged_attention", "plugins.paged_attention.cpu", "plugins.paged_attention.reference"}


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("compiler", "plugins"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(path: Path, module: str) -> set[str]:
    """Every absolute name `path` imports, and each `from X import y` as X.y too (y may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for module, path in mods.items():
        deps = set()
        for name in _imported(path, module):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            # a module importing its own package's face (compiler.backends from compiler.backends.x) is not a cycle
            if name and name != module and not module.startswith(name + "."):
                deps.add(name)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_runtime_imports_nothing_of_the_build_side():
    graph = _graph()
    bad = {m: sorted(d for d in deps if not d.startswith(("compiler.runtime", "compiler.errors")) and d not in RUNTIME_PLUGINS)
           for m, deps in graph.items() if m.startswith("compiler.runtime") or m in RUNTIME_PLUGINS}
    assert {m: d for m, d in bad.items() if d} == {}


# the layers below the build: they never reach up into the stages that drive them
LOWER = ("compiler.frontend", "compiler.ir", "compiler.passes", "compiler.backends")
UPPER = ("compiler.build", "compiler.ship", "compiler.serve", "compiler.tune", "compiler.cli")


def test_imports_flow_one_way():
    graph = _graph()
    up = {m: sorted(d for d in deps if d.startswith(UPPER)) for m, deps in graph.items() if m.startswith(LOWER)}
    assert {m: d for m, d in up.items() if d} == {}
    shipped = {m: sorted(d for d in deps if d.startswith(("compiler.serve", "compiler.tune")))
               for m, deps in graph.items() if m.startswith(("compiler.build", "compiler.ship"))}
    assert {m: d for m, d in shipped.items() if d} == {}


def test_runtime_third_party_imports_are_what_a_server_has():
    mods = _modules()
    stdlib = set(sys.stdlib_module_names)
    found = {}
    for module, path in mods.items():
        if module.startswith("compiler.runtime") or module in RUNTIME_PLUGINS:
            tops = {n.split(".")[0] for n in _imported(path, module)}
            extra = tops - stdlib - SERVER_PACKAGES - {"compiler", "plugins", "__future__", ""} - ({"torch"} if module in TORCH_USERS else set()) - OPTIONAL.get(module, set())
            if extra:
                found[module] = sorted(extra)
    assert found == {}
