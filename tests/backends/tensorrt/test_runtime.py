"""Running TensorRT engines: a plain refusal where there is no GPU, and (GPU machines only)
the engine's logits and greedy tokens against the ONNX Runtime engine of the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.runtime.engine import load
from tests.conftest import build_artifact

pytest.importorskip("tensorrt_rtx")


@pytest.fixture(scope="module")
def trt_artifact(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    return build_artifact(tiny_checkpoints["llama"], root, "llama-trt", backend="tensorrt", max_seq=128, max_batch=2)


def test_load_without_gpu_says_what_the_engine_needs(trt_artifact):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=r"needs an NVIDIA GPU of compute capability SM80, SM86, SM89, SM120"):
        load(trt_artifact)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe"])
def test_engine_matches_onnxruntime(arch, tiny_checkpoints, tmp_path):
    """Each lowered op's numerics on a real GPU: the fp16 engine against the fp32 ORT engine."""
    src = tiny_checkpoints[arch]
    trt_art = build_artifact(src, tmp_path, f"{arch}-trt", backend="tensorrt", max_seq=128, max_batch=2)
    ort_art = build_artifact(src, tmp_path, f"{arch}-ort", max_seq=128, max_batch=2, onnxruntime={"graph": "standard"})
    trt_engine, ort_engine = load(trt_art), load(ort_art)
    ids = np.arange(3, 40, dtype=np.int64)[None]
    logits = []
    for eng in (trt_engine, ort_engine):
        s = eng.session
        io = s.binding(s.new_cache(1))
        logits.append(np.array(s.step(io, ids, np.arange(ids.shape[1])[None])))
    assert np.abs(logits[0] - logits[1]).max() < 5e-2  # fp16 engine vs fp32
    a = trt_engine.generate("The history of", max_new_tokens=16)
    b = ort_engine.generate("The history of", max_new_tokens=16)
    assert a.token_ids[:8] == b.token_ids[:8]
