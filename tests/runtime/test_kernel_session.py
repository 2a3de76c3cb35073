"""Engines cut at kiln's attention kernel (runtime/kernel_session.py): fp32 rows give ONNX Runtime's
logits and greedy tokens on every decoder family; int8 / fp8 / fp16 / bf16 rows stay within their
bounds; the KV dtype is recorded (engine.json, kiln.json, the card) and its bytes are what the KV
budget counts; a tampered kernel step is refused at load. (The engine core's batching, chunking,
prefix reuse, KV budget and speculation tests run on the kiln engines too: test_core.py,
test_speculative.py.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from compiler.runtime import load
from compiler.runtime.config import InvalidEngineConfig
from compiler.runtime.kernel_session import KernelSession
from compiler.runtime.kv_memory import KVBlocks
from tests.conftest import build_artifact
from tests.tiny_models import TINY_ARCHS

PROMPT = "The quick brown fox jumps over the lazy dog because"


def _calls(engine) -> list[np.ndarray]:
    """Logits of a two-row prefill of different lengths (every position), then three decode steps."""
    s = engine.session
    io = s.binding(s.new_cache(2))
    ids = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    pos = np.array([np.arange(6), np.arange(6)])
    out = [s.step(io, ids, pos, np.tile(np.arange(6), (2, 1))).copy()]
    for t in range(3):
        out.append(s.step(io, np.array([[20 + t], [30 + t]]), np.array([[6 + t], [6 + t]])).copy())
    return out


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_fp32_rows_give_onnx_runtimes_logits_and_tokens(tiny_artifacts, arch):
    kiln, ort_engine = load(tiny_artifacts[(arch, "kiln")]), load(tiny_artifacts[(arch, "standard")])
    assert isinstance(kiln.session, KernelSession) and kiln.config.kv_cache.dtype == "float32"
    for mine, theirs in zip(_calls(kiln), _calls(ort_engine)):
        np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)
    assert kiln.generate(PROMPT, max_new_tokens=16).token_ids == ort_engine.generate(PROMPT, max_new_tokens=16).token_ids


@pytest.mark.parametrize("dtype,bound", [("int8", 0.02), ("fp8", 0.08), ("fp16", 1e-3), ("bf16", 1e-2)])
def test_quantised_rows_stay_within_their_bound(tiny_artifacts, tiny_checkpoints, tmp_path, dtype, bound):
    art = tiny_artifacts[("llama", "kiln-int8")] if dtype == "int8" else \
        build_artifact(tiny_checkpoints["llama"], tmp_path, f"llama-{dtype}", kv_cache={"dtype": dtype},
                       quality={"window": 128})
    exact = _calls(load(tiny_artifacts[("llama", "kiln")]))
    got = _calls(load(art))
    scale = max(np.abs(x).max() for x in exact)
    assert max(np.abs(g - e).max() for g, e in zip(got, exact)) < bound * scale


def test_the_kv_dtype_is_recorded_and_gated(tiny_artifacts):
    art = tiny_artifacts[("llama", "kiln-int8")]
    engine = json.loads((art / "engine.json").read_text())
    assert engine["kv_cache"]["dtype"] == "int8" and "kiln-attention int8" in engine["graph_flavour"]
    kernels = [s for s in engine["steps"] if "kernel" in s]
    assert len(kernels) == engine["kv_cache"]["num_layers"] and all(s["kv_dtype"] == "int8" for s in kernels)
    manifest = json.loads((art / "kiln.json").read_text())
    kv = engine["kv_cache"]
    assert manifest["kv_cache"] == {"dtype": "int8", "attention": "kiln", "scaled": True,
                                    "bytes_per_token": 2 * kv["num_layers"] * kv["num_kv_heads"] * (kv["head_dim"] + 4)}
    assert manifest["quality"]["ppl_increase_pct"] is not None  # the gate scored the int8 rows against fp32
    assert manifest["plugins"] == [{"op": "kiln::PagedAttention", "nodes": kv["num_layers"], "bound": "kernel",
                                    "why": "the engine is cut at it and kiln's CPU kernel runs it between the parts"}]
    card = (art / "README.md").read_text()
    assert "KV cache: int8 rows with a scale per token and head" in card and "Against the fp32 engine" in card


def test_the_kv_budget_counts_the_rows_bytes(tiny_artifacts):
    fp32 = load(tiny_artifacts[("llama", "kiln")]).config.kv_cache
    int8 = load(tiny_artifacts[("llama", "kiln-int8")]).config.kv_cache
    a, b = KVBlocks.for_cache(fp32, 1.0), KVBlocks.for_cache(int8, 1.0)
    ratio = (b.capacity * b.block_tokens) / (a.capacity * a.block_tokens)
    assert ratio == pytest.approx(4 * fp32.head_dim / (fp32.head_dim + 4), rel=0.02)  # head_dim 64: 3.76x


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.update(kernel="FlashAttention"), "is not a kernel this runtime runs"),
    (lambda s: s.update(kv_dtype="float32"), "rows are float32 but kv_cache says int8"),
    (lambda s: s["inputs"].__setitem__(3, "past_key.99"), "not a layer's past_key"),
])
def test_a_tampered_kernel_step_is_refused_at_load(tiny_artifacts, tmp_path, edit, needle):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts[("llama", "kiln-int8")], art)
    cfg = json.loads((art / "engine.json").read_text())
    edit(next(s for s in cfg["steps"] if "kernel" in s))
    (art / "engine.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidEngineConfig, match=needle):
        load(art, verify=False)


@pytest.mark.parametrize("part", ["../../../etc/passwd", "/etc/passwd", "model.part0.so", 7])
def test_a_step_naming_a_file_outside_the_artifact_is_refused(tiny_artifacts, tmp_path, part):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts[("llama", "kiln")], art)
    cfg = json.loads((art / "engine.json").read_text())
    cfg["steps"][0]["part"] = part
    (art / "engine.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidEngineConfig, match="is not an .onnx file name inside the artifact"):
        load(art, verify=False)
