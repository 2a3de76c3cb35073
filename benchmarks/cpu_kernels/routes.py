"""The routes of benchmarks/bench_cpu_kernels.py: each case built for ONNX Runtime, OpenVINO, a C
kernel compiled here, and Apache TVM. Each maker returns (run, view): run() computes the case,
view(output) puts it in the reference's layout [rows, HQ, new, D] or [M, N]."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HQ, HKV, D = 9, 3, 64  # SmolLM2-135M's attention
K, N, BLOCK = 576, 1536, 32  # its gate/up projection, 4-bit blocks of 32


# -- ONNX Runtime -------------------------------------------------------------------------------
def ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    model.ir_version = 10  # what this onnxruntime reads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_gqa(q, k, v, threads: int, layers: int = 1):
    """GroupQueryAttention as kiln's contrib graph runs it: packed [B, S, H * D] inputs, the past in
    a max_seq buffer that is also the present (IO binding, written in place at seqlens); `layers`
    nodes in one call, each over its own cache (the same values: the traffic of `layers` layers)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rows, _, new, _ = q.shape
    past, cap = k.shape[2] - new, 1024
    f = TensorProto.FLOAT
    kv_shape = [rows, HKV, cap, D]
    nodes, ins, outs = [], [], []
    for i in range(layers):
        nodes.append(helper.make_node("GroupQueryAttention", ["q", "k", "v", f"pk{i}", f"pv{i}", "seqlens", "total"],
                                      [f"out{i}", f"ck{i}", f"cv{i}"], domain="com.microsoft", num_heads=HQ, kv_num_heads=HKV))
        ins += [helper.make_tensor_value_info(f"pk{i}", f, kv_shape), helper.make_tensor_value_info(f"pv{i}", f, kv_shape)]
        outs += [helper.make_tensor_value_info(n, f, kv_shape) for n in (f"ck{i}", f"cv{i}")]
    g = helper.make_graph(nodes, "gqa", [
        helper.make_tensor_value_info("q", f, [rows, new, HQ * D]), helper.make_tensor_value_info("k", f, [rows, new, HKV * D]),
        helper.make_tensor_value_info("v", f, [rows, new, HKV * D]), *ins,
        helper.make_tensor_value_info("seqlens", TensorProto.INT32, [rows]), helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        outs + [helper.make_tensor_value_info(f"out{i}", f, None) for i in range(layers)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort_session(model, threads)
    packed = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(rows, new, -1))  # noqa: E731
    io = sess.io_binding()
    for name, x in (("q", packed(q)), ("k", packed(k[:, :, past:])), ("v", packed(v[:, :, past:])),
                    ("seqlens", np.full(rows, past + new - 1, np.int32)), ("total", np.array(past + new, np.int32))):
        io.bind_cpu_input(name, x)
    keep = []
    for i in range(layers):
        for src, (pin, pout) in ((k, (f"pk{i}", f"ck{i}")), (v, (f"pv{i}", f"cv{i}"))):
            buf = np.zeros(kv_shape, np.float32)
            buf[:, :, :past] = src[:, :, :past]
            val = ort.OrtValue.ortvalue_from_numpy(buf)
            keep.append((buf, val))
            io.bind_ortvalue_input(pin, val)
            io.bind_ortvalue_output(pout, val)
    for i in range(layers):
        io.bind_output(f"out{i}")

    def run():
        sess.run_with_iobinding(io)
        return io.get_outputs()[-1].numpy()  # bound after the caches: the last layer's output
    return run, lambda out: out.reshape(rows, new, HQ, D).transpose(0, 2, 1, 3)


def ort_attention(q, k, v, threads: int):
    """The standard Attention op (opset 23) over the full key range, causal."""
    from onnx import TensorProto, helper

    rows, _, new, _ = q.shape
    total = k.shape[2]
    f = TensorProto.FLOAT
    mask = np.where(np.arange(total)[None, :] > (total - new + np.arange(new))[:, None], -np.inf, 0).astype(np.float32)
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["out"], q_num_heads=HQ, kv_num_heads=HKV)
    g = helper.make_graph([node], "attn", [
        helper.make_tensor_value_info("q", f, list(q.shape)), helper.make_tensor_value_info("k", f, list(k.shape)),
        helper.make_tensor_value_info("v", f, list(v.shape)), helper.make_tensor_value_info("mask", f, [new, total])],
        [helper.make_tensor_value_info("out", f, None)])
    sess = ort_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]), threads)
    feeds = {"q": q, "k": k, "v": v, "mask": mask}
    return (lambda: sess.run(["out"], feeds)[0]), (lambda out: out)


def ort_int4(x, weights, threads: int):
    """MatMulNBits, 4 bits, block 32, symmetric (zero point 8), accuracy level 4 (int8 activations)."""
    from onnx import TensorProto, helper, numpy_helper

    M = x.shape[0]
    nodes, inits = [], []
    for i, (codes, scales) in enumerate(weights):
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(N, K // BLOCK, BLOCK // 2)
        inits += [numpy_helper.from_array(packed, f"w{i}"), numpy_helper.from_array(scales.reshape(-1), f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft", K=K, N=N,
                                      bits=4, block_size=BLOCK, accuracy_level=4))
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(len(weights))], ["y"]))
    g = helper.make_graph(nodes, "q4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort_session(model, threads)
    return (lambda: sess.run(["y"], {"x": x})[0]), (lambda out: out)


# -- OpenVINO -----------------------------------------------------------------------------------
def ov_compile(model, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                 "INFERENCE_PRECISION_HINT": "f32"})
    return compiled.create_infer_request()


def ov_sdpa(q, k, v, threads: int):
    """ScaledDotProductAttention with the query heads of each KV head packed along the sequence
    ([rows, HKV, group * new, D] against [rows, HKV, T, D]: exact GQA, no KV copy), causal mask
    tiled per packed row."""
    import openvino as ov
    import openvino.opset13 as ops

    rows, _, new, _ = q.shape
    total, group = k.shape[2], HQ // HKV
    packed = np.ascontiguousarray(q.reshape(rows, HKV, group * new, D))  # query head h = kv head h // group
    causal = np.where(np.arange(total)[None, :] > (total - new + np.arange(new))[:, None], -np.inf, 0).astype(np.float32)
    mask = np.tile(causal, (group, 1))  # [group * new, total]
    pq, pk, pv = (ops.parameter(x.shape, np.float32) for x in (packed, k, v))
    out = ops.scaled_dot_product_attention(pq, pk, pv, ops.constant(mask), causal=False)
    req = ov_compile(ov.Model([out], [pq, pk, pv], "sdpa"), threads)
    run = lambda: req.infer([packed, k, v], share_inputs=True, share_outputs=True)[0]  # noqa: E731
    return run, (lambda out: out.reshape(rows, HQ, new, D))


def ov_int4(x, weights, threads: int):
    """A u4 weight [N, K / BLOCK, BLOCK] with zero point 8 and f32 scales, converted and scaled in
    the graph ahead of MatMul: the decompression pattern the CPU plugin runs as a compressed
    FullyConnected (dynamic int8 quantisation of the activations on VNNI / AMX)."""
    import openvino as ov
    import openvino.opset13 as ops

    px = ops.parameter(x.shape, np.float32)
    ys = []
    for codes, scales in weights:
        w = ov.op.Constant(ov.Type.u4, ov.Shape([N, K // BLOCK, BLOCK]), codes.reshape(-1).tolist())
        zero = ov.op.Constant(ov.Type.u4, ov.Shape([1, 1, 1]), [8])
        wf = ops.multiply(ops.subtract(ops.convert(w, ov.Type.f32), ops.convert(zero, ov.Type.f32)),
                          ops.constant(scales[:, :, None]))
        ys.append(ops.matmul(px, ops.reshape(wf, np.array([N, K], np.int64), False), False, True))
    y = ys[0]
    for other in ys[1:]:
        y = ops.add(y, other)
    req = ov_compile(ov.Model([y], [px], "q4"), threads)
    return (lambda: req.infer([x], share_inputs=True, share_outputs=True)[0]), (lambda out: out)


# -- the kernel kiln owns (plugins/paged_attention: what the engines cut at attention run) --------
def own_attention(q, k, v, threads: int, dtype: str = "float32", layers: int = 1):
    """kiln::PagedAttention's CPU kernel (the build for this CPU): q [rows, HQ, S, D] are the last S
    of the T positions of k, v [rows, HKV, T, D], whose rows (in `dtype`: float32 or int8 with a
    scale per token and head) it reads in place after writing the S new keys and values; `layers`
    calls, each over its own copy of the rows."""
    from plugins.paged_attention import cpu
    from plugins.paged_attention.reference import encode

    kernel = cpu.load(threads)
    rows, hq, new, d = q.shape
    hkv, total = k.shape[1], k.shape[2]
    qq = np.ascontiguousarray(q.transpose(0, 2, 1, 3).reshape(rows, new, hq * d))  # [rows, S, HQ*D]
    kn, vn = (np.ascontiguousarray(x[:, :, total - new:].transpose(0, 2, 1, 3).reshape(rows, new, hkv * d)) for x in (k, v))
    pos = np.tile(np.arange(total - new, total, dtype=np.int64), (rows, 1))
    out = np.empty_like(qq)

    def stored(x):
        values, scale = encode(x, dtype)
        return np.ascontiguousarray(values), None if scale is None else np.ascontiguousarray(scale[..., None])

    sets = []
    for _ in range(layers):
        (kr, ks), (vr, vs) = stored(k), stored(v)
        sets.append(kernel.prepare(qq, kn, vn, kr, vr, ks, vs, pos, (hq, hkv), dtype, 0, 0.0, out))

    def call():
        for run in sets:
            run()
        return out
    return call, (lambda o: o.reshape(rows, new, hq, d).transpose(0, 2, 1, 3))


# -- Apache TVM ---------------------------------------------------------------------------------
def tvm_int4(x, weights, threads: int):
    """The int4 product as one TIR kernel (dequantise in the reduction), LLVM for this CPU."""
    import os

    os.environ["TVM_NUM_THREADS"] = str(threads)
    import tvm
    from tvm import te

    M = x.shape[0]
    X = te.placeholder((M, K), "float32", name="X")
    C = te.placeholder((N, K), "uint8", name="C")
    S = te.placeholder((N, K // BLOCK), "float32", name="S")
    r = te.reduce_axis((0, K), name="r")
    Y = te.compute((M, N), lambda i, j: te.sum(X[i, r] * ((C[j, r].astype("float32") - 8.0) * S[j, r // BLOCK]), axis=r),
                   name="Y")
    func = te.create_prim_func([X, C, S, Y])
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("Y")
    i, j, k = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, 16])
    sch.reorder(i, jo, k, ji)
    sch.parallel(jo)
    sch.vectorize(ji)
    lib = tvm.compile(sch.mod, target={"kind": "llvm", "mcpu": _llvm_cpu()})
    dev = tvm.cpu()
    xs = tvm.runtime.tensor(x, dev)
    layers = [(tvm.runtime.tensor(c, dev), tvm.runtime.tensor(s, dev), tvm.runtime.empty((M, N), "float32", dev))
              for c, s in weights]

    def run():
        for c, s, y in layers:
            lib(xs, c, s, y)
        return sum(y.numpy() for _, _, y in layers)
    return run, (lambda out: out)


def _llvm_cpu() -> str:
    """LLVM's name for this CPU's ISA level (AVX-512 + AMX: sapphirerapids; AVX-512: skylake-avx512)."""
    flags = Path("/proc/cpuinfo").read_text().split()
    if "amx_tile" in flags:
        return "sapphirerapids"
    return "skylake-avx512" if "avx512f" in flags else "haswell" if "avx2" in flags else "x86-64"
