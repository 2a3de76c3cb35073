"""paged_attention: schema, decomposition vs reference, every CPU build of the kernel vs the reference
(each KV dtype, GQA, windows, writes across page boundaries), and the fallbacks a CPU without an
instruction set (or a machine without a compiler) gets."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

import plugins
from plugins.paged_attention import cpu
from plugins.testing import run_decomposition
from plugins.paged_attention.reference import FP8_VALUES, encode, fp8_decode, fp8_encode, reference

PLUGIN = plugins.get("paged_attention")
T = onnx.TensorProto
DTYPES = ["float32", "float16", "bfloat16", "int8", "float8_e4m3fn"]
BUILDS = [isa for isa in cpu.runnable(cpu.cpu_flags()) if cpu.library(isa) is not None]  # built now if missing
needs_compiler = pytest.mark.skipif("portable" not in BUILDS, reason="no C compiler built the kernel")


def _case(seed=0, B=2, S=3, NQ=6, NKV=2, D=16, M=80, start=(15, 62)):
    """A call of S tokens per row at positions start[b].., over rows with a random past."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, S, NQ * D)).astype(np.float32)
    k = (rng.standard_normal((B, S, NKV * D)) * 3).astype(np.float32)
    v = rng.standard_normal((B, S, NKV * D)).astype(np.float32)
    past = rng.standard_normal((2, B, NKV, M, D)).astype(np.float32)
    pos = np.array([np.arange(s, s + S) for s in start], dtype=np.int64)
    return q, k, v, past, pos, (NQ, NKV)


def _rows(past: np.ndarray, dtype: str):
    """The stored rows and scales of a float past, as the kernel keeps them."""
    out = []
    for x in past:
        stored, scale = encode(x, dtype)
        out += [np.ascontiguousarray(stored), None if scale is None else np.ascontiguousarray(scale[..., None])]
    return out[0], out[2], out[1], out[3]  # k rows, v rows, k scales, v scales


def test_schema_and_shape_inference():
    F, attrs = T.FLOAT, PLUGIN.attributes({"num_heads": 9, "kv_num_heads": 3})
    shapes = [["B", "S", 576], ["B", "S", 192], ["B", "S", 192], ["B", 3, 2048, 64], ["B", 3, 2048, 64], ["B", "S"]]
    types = [F, F, F, F, F, T.INT64]
    assert PLUGIN.infer(types, shapes, attrs)[0] == (F, ["B", "S", 576])
    with pytest.raises(ValueError, match=r"query heads \(9\) must be a multiple of KV heads \(2\)"):
        PLUGIN.infer(types, shapes, {**attrs, "kv_num_heads": 2})
    with pytest.raises(ValueError, match="rows of kv_dtype int8 must be INT8"):
        PLUGIN.infer(types, shapes, {**attrs, "kv_dtype": "int8"})
    with pytest.raises(ValueError, match="kv_dtype 'int4' is not one of"):
        PLUGIN.infer(types, shapes, {**attrs, "kv_dtype": "int4"})
    with pytest.raises(ValueError, match="need past_k_scale"):
        PLUGIN.infer([F, F, F, T.INT8, T.INT8, T.INT64], shapes, {**attrs, "kv_dtype": "int8"})


@pytest.mark.parametrize("attrs", [{}, {"window": 3}, {"scale": 0.3}])
def test_decomposition_matches_reference(attrs):
    q, k, v, past, pos, (nq, nkv) = _case()
    attrs = PLUGIN.attributes({"num_heads": nq, "kv_num_heads": nkv, **attrs})
    arrays = [q, k, v, past[0], past[1], pos]
    got = run_decomposition(PLUGIN, arrays, attrs)
    for g, want in zip(got, PLUGIN.reference(*arrays, **attrs)):
        np.testing.assert_allclose(g, want, atol=2e-6)


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 4])
def test_each_build_matches_the_reference(isa, dtype, window):
    """Writes across a 16-token prefix block (positions 15..17) and a 4 KiB page of rows (62..64: a
    page holds 64 fp32 tokens of D=16) store exactly the reference's codes, its scales to rounding."""
    q, k, v, past, pos, heads = _case(seed=DTYPES.index(dtype) * 10 + window)
    kr, vr, ks, vs = _rows(past, dtype)
    want_rows = [x.copy() if x is not None else None for x in (kr, vr, ks, vs)]
    want = reference(q, k, v, *want_rows, pos, *heads, 0.0, window, dtype, inplace=True)
    kernel = cpu.load(2, forced=isa)
    assert kernel.isa == isa
    got = kernel(q, k, v, kr, vr, ks, vs, pos, heads, dtype, window)
    np.testing.assert_allclose(got, want, atol=5e-6)
    np.testing.assert_array_equal(kr, want_rows[0])
    np.testing.assert_array_equal(vr, want_rows[1])
    for mine, theirs in zip((ks, vs), want_rows[2:]):
        if mine is not None:
            np.testing.assert_allclose(mine, theirs, rtol=1e-6)


def test_quantised_rows_stay_within_their_bound():
    """int8 / fp8 rows against float32 rows on the same call: the cost of the smaller cache."""
    q, k, v, past, pos, heads = _case(seed=3, S=1, M=600, start=(300, 599))
    exact = reference(q, k, v, *_rows(past, "float32"), pos, *heads)
    for dtype, bound in (("int8", 2e-2), ("float8_e4m3fn", 8e-2)):
        got = cpu.load(2)(q, k, v, *_rows(past, dtype), pos, heads, dtype)
        assert np.abs(got - exact).max() < bound * np.abs(exact).max(), dtype


def test_fp8_codes_round_trip_and_saturate():
    codes = np.arange(256, dtype=np.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]
    nonzero = finite[(finite & 0x7F) != 0]  # -0 codes as +0, in the kernel too
    np.testing.assert_array_equal(fp8_encode(fp8_decode(nonzero)), nonzero)
    assert fp8_encode(np.float32([1e6, -1e6])).tolist() == [0x7E, 0xFE] and FP8_VALUES[-1] == 448


@needs_compiler
def test_a_cpu_without_the_instruction_sets_falls_back_with_one_line():
    lines = []
    kernel = cpu.load(1, flags=set(), notice=lines.append)
    assert kernel.isa == "portable" and len(lines) == 1 and "portable kernel" in lines[0]
    q, k, v, past, pos, heads = _case(seed=5)
    rows = _rows(past, "int8")
    want = reference(q, k, v, *[x.copy() for x in rows], pos, *heads, dtype="int8")
    np.testing.assert_allclose(kernel(q, k, v, *rows, pos, heads, "int8"), want, atol=5e-6)


def test_without_a_compiler_numpy_runs_it(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))  # no build cached here
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    lines = []
    kernel = cpu.load(1, notice=lines.append)
    assert kernel.isa == "numpy" and len(lines) == 1 and "no C compiler" in lines[0]
    q, k, v, past, pos, heads = _case(seed=6)
    rows = _rows(past, "float16")
    want = reference(q, k, v, *[x.copy() if x is not None else None for x in rows], pos, *heads, dtype="float16")
    np.testing.assert_allclose(kernel(q, k, v, *rows, pos, heads, "float16"), want, atol=1e-6)


@needs_compiler
def test_forcing_a_path_by_name_and_refusing_unknown_ones(monkeypatch):
    monkeypatch.setenv("KILN_CPU_ISA", "portable")
    assert cpu.load(1).isa == "portable"
    monkeypatch.setenv("KILN_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match="KILN_CPU_ISA='avx9000' is not one of"):
        cpu.load(1)


@needs_compiler
def test_shapes_outside_the_kernel_are_refused_by_name():
    q, k, v, past, pos, _ = _case(NQ=66, NKV=2)
    with pytest.raises(cpu.KernelError, match="at most 32 query heads a KV head"):
        cpu.load(1, forced="portable")(q, k, v, *_rows(past, "float32"), pos, (66, 2), "float32")


def test_a_prepared_call_keeps_its_buffers_alive():
    """prepare() holds raw pointers: it must own references to what they point into (its callers
    may drop theirs, as the kernel benchmark does layer after layer)."""
    import gc

    q, k, v, past, pos, heads = _case(seed=7, S=1, M=1 << 15, start=(30000, 32767))  # rows in mappings of their own
    want = reference(q, k, v, *_rows(past, "int8"), pos, *heads, dtype="int8")
    out = np.empty_like(want)
    run = cpu.load(2).prepare(q, k, v, *_rows(past, "int8"), pos, heads, "int8", 0, 0.0, out)
    del q, k, v, past, pos
    gc.collect()
    junk = [np.full((1 << 20,), 7.0) for _ in range(8)]  # reuse the freed memory if it was freed
    run()
    np.testing.assert_allclose(out, want, atol=5e-6)
    assert junk


def test_the_rewrite_takes_every_layer_and_retypes_quantised_rows(tmp_path):
    from compiler.frontend import models
    from compiler.frontend.checkpoint import Checkpoint
    from plugins.paged_attention.rewrite import FusePagedAttention
    from tests.tiny_models import make_tiny

    ckpt = Checkpoint.open(make_tiny("gemma3", tmp_path / "gemma3"))  # a sliding and a full layer, a scale of its own
    arch = models.lookup(ckpt.config)
    model = arch.build(arch.config(ckpt.config), ckpt, 64)
    result = FusePagedAttention("int8", (4, 2)).run(model)
    nodes = [n for n in model.graph if n.op_type == "PagedAttention"]
    assert result.changed and len(nodes) == 2 and not any(n.op_type in ("Attention", "TensorScatter") for n in model.graph)
    assert sorted(n.attributes["window"].value for n in nodes) == [0, 16]
    assert all(n.attributes["scale"].value == pytest.approx(24 ** -0.5) for n in nodes)
    names = {v.name: v.dtype.name for v in model.graph.inputs}
    assert names["past_key.0"] == "INT8" and names["past_value_scale.1"] == "FLOAT"
    assert nodes[0].name.startswith("/layers.0/") and nodes[0].name.endswith("/PagedAttention")


def test_a_layer_the_rewrite_refuses_fails_the_build_naming_why(tiny_model):
    from compiler.errors import KilnError
    from plugins.paged_attention.rewrite import FusePagedAttention

    model = tiny_model()
    att = next(n for n in model.graph if n.op_type == "Attention")
    att.attributes["softcap"] = ir.AttrFloat32("softcap", 30.0)
    with pytest.raises(KilnError, match="1 attention nodes could not become kiln::PagedAttention .*softcap"):
        FusePagedAttention("float32", (4, 2)).run(model)


@pytest.mark.parametrize("isa", BUILDS + ["numpy"])
def test_positions_outside_the_rows_write_nothing_and_read_inside(isa):
    """A position below 0 or at / past max_seq (a crafted or clipped call) never writes outside the
    rows; its query attends over the rows it can see (clamped), as the reference does."""
    q, k, v, past, pos, heads = _case(seed=8, S=2, M=32, start=(0, 0))
    pos = np.array([[-1, 3], [31, 40]], dtype=np.int64)
    kr, vr, ks, vs = _rows(past, "int8")
    guard = np.full(64, 99, np.int8)  # bytes just past the rows' buffer
    both = np.concatenate([kr.reshape(-1), guard])
    kr = both[: kr.size].reshape(kr.shape)
    want_rows = [x.copy() for x in (kr, vr, ks, vs)]
    want = reference(q, k, v, *want_rows, pos, *heads, dtype="int8", inplace=True)
    got = cpu.load(1, forced=isa)(q, k, v, kr, vr, ks, vs, pos, heads, "int8")
    np.testing.assert_allclose(got, want, atol=5e-6)
    np.testing.assert_array_equal(kr, want_rows[0])
    assert (both[kr.size:] == 99).all()
