"""ONNX Runtime CUDA engines: what the CPU can check (half-precision graphs, the session options
kiln writes, the refusal without the CUDA provider, the fp16 graph's numerics through the CPU
provider) and, on a GPU machine, parity with transformers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.cli import main
from compiler.errors import KilnError
from compiler.runtime import load
from compiler.runtime.session import ProviderUnavailable
from tests.conftest import build_artifact

CUDA = {"device": "cuda", "precision": "float16", "graph": "standard"}


@pytest.fixture(scope="module")
def fp16(tiny_checkpoints, tmp_path_factory):
    return build_artifact(tiny_checkpoints["llama"], tmp_path_factory.mktemp("cuda"), "llama-fp16", max_seq=64,
                          onnxruntime=CUDA)


def test_half_graph_keeps_fp32_where_it_matters(fp16):
    m = onnx.load(str(fp16 / "model.onnx"), load_external_data=False)
    io = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
    assert io["past_key.0"] == io["present_value.1"] == onnx.TensorProto.FLOAT16
    assert io["logits"] == onnx.TensorProto.FLOAT and io["input_ids"] == onnx.TensorProto.INT64
    assert {i.data_type for i in m.graph.initializer if i.data_type in (1, 10)} == {onnx.TensorProto.FLOAT16}
    attrs = {(n.op_type, a.name): a.i for n in m.graph.node for a in n.attribute}
    assert attrs[("RMSNormalization", "stash_type")] == 1
    assert attrs[("Attention", "softmax_precision")] == onnx.TensorProto.FLOAT


class _Given(Exception):
    """Raised by the stand-in InferenceSession once it has seen what the runtime gives it."""


@pytest.mark.parametrize("options", [{}, {"device_id": 1, "cuda_graph": False, "int4_accuracy_level": 2}])
def test_the_recipes_cuda_options_are_what_onnx_runtime_is_given(fp16, tmp_path, monkeypatch, options):
    """Built on CPU, loaded with ONNX Runtime's session constructor stood in for (this onnxruntime
    has no CUDA provider): the provider, its options and the session options the runtime passes
    follow the recipe, and are exactly what engine.json recorded."""
    art = fp16 if not options else build_artifact(json.loads((fp16 / "kiln.json").read_text())["source"]["path"], tmp_path,
                                                  "llama-fp16-opts", max_seq=64, onnxruntime={**CUDA, **options})
    given = {}

    def session(path, sess_options=None, providers=None, **kw):
        given.update(path=path, options=sess_options, providers=providers)
        raise _Given

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(_Given):
        load(art)
    recorded = json.loads((art / "engine.json").read_text())
    [(provider, provider_options)] = given["providers"]
    assert provider == "CUDAExecutionProvider" and str(given["path"]) == str(art / "model.onnx")
    assert provider_options["device_id"] == str(options.get("device_id", 0))
    assert provider_options["enable_cuda_graph"] == ("1" if options.get("cuda_graph", True) else "0")
    assert recorded["session"]["cuda_graph"] is options.get("cuda_graph", True)  # the runtime's graph capture follows
    assert provider_options == recorded["session"]["provider_options"]  # nothing added or lost on the way
    so = given["options"]
    assert so.intra_op_num_threads == 1  # the CPU side only launches kernels
    assert so.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == str(options.get("int4_accuracy_level", 4))
    assert recorded["kv_cache"]["dtype"] == "float16"


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_refused_plainly_without_the_cuda_provider(fp16, capsys):
    with pytest.raises(ProviderUnavailable, match=r"needs onnxruntime-gpu \(pip install 'kiln\[cuda\]'\)"):
        load(fp16)
    assert main(["run", str(fp16), "--prompt", "Hi"]) == 2
    assert "CUDAExecutionProvider" in capsys.readouterr().err


def test_fp16_graph_numerics_through_the_cpu_provider(fp16):
    """The half graph's dtype plumbing, run by the CPU provider (which computes it in fp32 with
    fp16 weights): close to the fp32 engine and the same argmax."""
    def logits(path, dtype):
        s = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {"input_ids": np.arange(3, 23)[None], "position_ids": np.arange(20)[None], "logits_positions": np.arange(20)[None]}
        for i in s.get_inputs():
            if i.name.startswith("past_"):
                feeds[i.name] = np.zeros([1, 2, 64, 16], dtype)
        return s.run(["logits"], feeds)[0]

    ref = _fp32_reference(fp16)
    got = logits(fp16, np.float16)
    assert np.abs(got - logits(ref, np.float32)).max() < 5e-2
    assert (got.argmax(-1) == logits(ref, np.float32).argmax(-1)).all()


def _fp32_reference(fp16):
    manifest = json.loads((fp16 / "kiln.json").read_text())
    return build_artifact(manifest["source"]["path"], fp16.parent, "llama-fp32", max_seq=64, onnxruntime={"graph": "standard"})


def test_half_precision_needs_cuda(tiny_checkpoints, tmp_path):
    with pytest.raises(KilnError, match="precision float16 needs device: cuda"):
        build_artifact(tiny_checkpoints["llama"], tmp_path, "bad", onnxruntime={"precision": "float16"})


@pytest.mark.gpu
def test_cuda_engine_matches_transformers(tiny_checkpoints, tmp_path):
    import torch
    import transformers

    art = build_artifact(tiny_checkpoints["llama"], tmp_path, "gpu", max_seq=256, onnxruntime={**CUDA, "graph": "contrib"})
    engine = load(art)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32).cuda().eval()
    ids = np.array([engine.text.encode("The history of the river and the town")])
    s = engine.session
    io = s.binding(s.new_cache(1))
    every = np.arange(ids.shape[1])[None]
    got = s.step(io, ids, every, every)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).cuda()).logits.float().cpu().numpy()
        want = model.generate(torch.from_numpy(ids).cuda(), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert np.abs(got - ref).max() <= 5e-2
    assert engine.generate("The history of the river and the town", max_new_tokens=64, stop_token_ids=()).token_ids == want
