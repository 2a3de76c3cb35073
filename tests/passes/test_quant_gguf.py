"""Quantization scheme gguf: SmolLM2's Q4_1 GGUF built on its own grids computes what the fp32
engine of the dequantised checkpoint computes; bad settings are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compiler.errors import KilnError
from compiler.build.recipe import parse_recipe
from tests.conftest import SMOLLM2_DIR, SMOLLM2_GGUF, build_artifact

needs_smollm2 = pytest.mark.skipif(not (SMOLLM2_GGUF.is_file() and (SMOLLM2_DIR / "config.json").is_file()),
                                   reason="run `make model` first")


@needs_smollm2
def test_smollm2_on_its_gguf_grids_equals_the_dequantised_fp32_engine(tmp_path):
    from compiler.runtime import load
    from tests.backends.onnxruntime.test_parity import engine_logits

    common = {"max_seq": 256, "max_batch": 1}
    gguf = build_artifact(SMOLLM2_DIR, tmp_path, "gguf", quantization={"scheme": "gguf", "file": str(SMOLLM2_GGUF)},
                          quality={"window": 128, "max_ppl_increase_pct": 0.05, "min_top1_agreement": 0.99}, **common)
    fp32 = build_artifact(SMOLLM2_DIR, tmp_path, "fp32", **common)
    ids = np.array([np.random.default_rng(0).integers(3, 49152, 96)])
    got, want = engine_logits(load(gguf), ids), engine_logits(load(fp32), ids)
    assert np.abs(got - want).max() < 5e-4  # measured 1.3e-4 with logits up to 41: summation order only
    assert (got.argmax(-1) == want.argmax(-1)).all()
    manifest = json.loads((gguf / "kiln.json").read_text())
    notes = [n for p in manifest["graph"]["passes"] for n in p["notes"]]
    assert "GGUF grids kept: Q4_1 210; 1 linears dequantised" in notes
    assert any(n.startswith("dequantised /lm_head/MatMul (Q8_0: kept as its exact fp32 values") for n in notes)
    assert manifest["quality"]["ppl_increase_pct"] == pytest.approx(0.0, abs=0.05)
    assert json.loads((gguf / "engine.json").read_text())["session"]["config_entries"][
        "session.qdq_matmulnbits_accuracy_level"] == "0"  # fp32 activations: the default of scheme gguf


def test_gguf_needs_a_gguf_file(tmp_path, tiny_checkpoints):
    with pytest.raises(KilnError, match="scheme gguf needs a .gguf file"):
        build_artifact(tiny_checkpoints["llama"], tmp_path, "g", quantization={"scheme": "gguf"})
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path, tiny_checkpoints):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 64)
    with pytest.raises(KilnError, match="junk.gguf is not a readable GGUF file"):
        build_artifact(tiny_checkpoints["llama"], tmp_path / "out", "g", quantization={"scheme": "gguf", "file": str(junk)})


def test_gguf_settings_are_checked_in_the_recipe():
    base = {"schema": 1, "name": "g", "source": "m.gguf", "quantization": {"scheme": "gguf"}}
    assert parse_recipe(base).onnxruntime.int4_accuracy_level == 0
    assert parse_recipe({**base, "onnxruntime": {"int4_accuracy_level": 4}}).onnxruntime.int4_accuracy_level == 4
    assert parse_recipe({**base, "backend": "tensorrt"}).quantization.scheme == "gguf"  # its grids are checked in the pass


@pytest.fixture(scope="session")
def smollm2_q4_0(tmp_path_factory):
    """SmolLM2's GGUF re-quantised to Q4_0 (every quantised tensor, lm_head included) and imported."""
    from compiler.frontend.gguf_import import import_gguf
    from tests.frontend.gguf_retype import retype

    if not SMOLLM2_GGUF.is_file():
        pytest.skip("run `make model` first")
    root = tmp_path_factory.mktemp("q4_0")
    path = retype(SMOLLM2_GGUF, root / "smollm2.Q4_0.gguf")
    return path, import_gguf(path, root / "imported", progress=False)


def test_q4_0_grids_equal_the_dequantised_fp32_engine(smollm2_q4_0, tmp_path):
    """Q4_0's fixed offset 8 becomes the integer zero point; nothing is left dequantised."""
    from compiler.runtime import load
    from tests.backends.onnxruntime.test_parity import engine_logits

    path, imported = smollm2_q4_0
    common = {"max_seq": 128, "max_batch": 1, "quality": {"gate": False}}
    gguf = build_artifact(imported, tmp_path, "gguf", quantization={"scheme": "gguf", "file": str(path)}, **common)
    fp32 = build_artifact(imported, tmp_path, "fp32", **common)
    ids = np.array([np.random.default_rng(1).integers(3, 49152, 64)])
    got, want = engine_logits(load(gguf), ids), engine_logits(load(fp32), ids)
    assert np.abs(got - want).max() < 5e-4
    notes = [n for p in json.loads((gguf / "kiln.json").read_text())["graph"]["passes"] for n in p["notes"]]
    assert "GGUF grids kept: Q4_0 211; 0 linears dequantised" in notes


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("signed", [False, True])
def test_each_4bit_form_computes_the_dequantised_product(kind, signed, tmp_path):
    """use_grid's graph (ONNX Runtime's uint4 + zero point, or TensorRT's signed int4 with the
    block constant moved into the correction) run on ONNX Runtime equals x @ dequantised W."""
    import onnx_ir as ir
    import onnxruntime as ort

    from compiler.frontend.gguf_grids import decode
    from compiler.passes.quant import qdq
    from compiler.passes.quant.gguf import use_grid
    from tests.frontend.test_gguf_grids import _random_rows

    K, N = 256, 64
    grid = decode(kind, _random_rows(kind, N, K), K)
    w = grid.dequantize().T  # [K, N]
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 3, K]))
    graph = ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 21})
    weight = qdq.initializer(graph, "lin.weight", w)
    mm = ir.Node("", "MatMul", [x, weight], name="/lin/MatMul")
    mm.outputs[0].name, mm.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph.append(mm)
    graph.outputs.append(mm.outputs[0])
    use_grid(graph, qdq.Linear(mm, weight), lambda: grid, grid, signed)
    graph.initializers.pop("lin.weight")
    dq = next(n for n in graph if n.op_type == "DequantizeLinear")
    assert dq.inputs[0].dtype == (ir.DataType.INT4 if signed else ir.DataType.UINT4) and (len(dq.inputs) == 2) == signed
    ir.save(ir.Model(graph, ir_version=10), tmp_path / "m.onnx")
    xs = np.random.default_rng(0).standard_normal((1, 3, K)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # fp32 activations, as kiln's engines
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"]).run(None, {"x": xs})[0]
    np.testing.assert_allclose(got, xs @ w, rtol=1e-4, atol=1e-4)
