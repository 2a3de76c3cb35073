"""`kiln export triton`: the repository it writes is loaded by the real `tritonserver` (from the
nvidia-pytriton wheel, on loopback), and generation through tritonclient's gRPC stream gives
the runtime's own text."""

from __future__ import annotations

import queue
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from compiler.cli import main
from compiler.ship.export_triton import pytriton_server
from compiler.runtime import load

pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def triton(tiny_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    artifact = tiny_artifacts[("llama", "contrib")]
    assert main(["export", "triton", str(artifact), "--repo", str(root / "repo"), "--name", "tiny", "--instances", "1",
                 "--threads", "1", "--max-batch", "2"]) == 0
    http, grpc, metrics = _ports(3)
    argv, env = pytriton_server(root / "repo", root / "backends", (http, grpc, metrics))
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/tiny/ready", timeout=1).status == 200:
                break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    else:
        proc.kill()
    if proc.poll() is not None:
        pytest.fail("tritonserver did not start: " + (root / "server.log").read_text()[-2000:])
    yield artifact, f"127.0.0.1:{grpc}", root
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a stuck model keeps the server waiting out its exit timeout
        proc.kill()
        proc.wait()


_TYPES = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32), "top_k": ("INT32", np.int32),
          "seed": ("INT64", np.int64), "chat": ("BOOL", np.bool_)}


def _input(name: str, value) -> "grpcclient.InferInput":
    if name == "stop":  # a list of strings
        arr = np.array([s.encode() for s in value], dtype=np.object_)
        kind = "BYTES"
    else:
        kind, dtype = _TYPES[name]
        arr = np.array([value], dtype=dtype)
    x = grpcclient.InferInput(name, list(arr.shape), kind)
    x.set_data_from_numpy(arr)
    return x


def _stream(url: str, prompt: str, max_tokens: int, **settings) -> tuple[str, int]:
    client = grpcclient.InferenceServerClient(url)
    out: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: out.put((result, error)))
    text_in = grpcclient.InferInput("text_input", [1], "BYTES")
    text_in.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    inputs = [text_in] + [_input(k, v) for k, v in {"max_tokens": max_tokens, **settings}.items()]
    client.async_stream_infer("tiny", inputs, enable_empty_final_response=True)
    text, pieces = "", 0
    while True:
        result, error = out.get(timeout=120)
        assert error is None, error
        final = result.get_response().parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            break
        text += result.as_numpy("text_output")[0].decode()
        pieces += 1
    client.stop_stream()
    client.close()
    return text, pieces


def test_repository_layout(triton):
    _, _, root = triton
    config = (root / "repo" / "tiny" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "decoupled: true" in config and "count: 1" in config
    assert (root / "repo" / "tiny" / "1" / "model.py").is_file()


def test_streaming_generation_matches_the_runtime(triton):
    artifact, url, _ = triton
    want = load(artifact).generate("Once upon a time", max_new_tokens=16)
    text, pieces = _stream(url, "Once upon a time", 16)
    assert text == want.text and pieces > 1


def test_every_generation_setting_reaches_the_engine(triton):
    """Stop strings, top-k sampling with a seed and chat templating, sent as Triton inputs, give
    what the runtime gives for the same settings (they go through the same conversion)."""
    artifact, url, _ = triton
    engine = load(artifact)
    prompt = "Once upon a time"
    plain = engine.generate(prompt, max_new_tokens=16).text
    stop = plain[len(plain) // 2: len(plain) // 2 + 3]
    for settings in ({"stop": [stop]}, {"top_k": 5, "temperature": 1.0, "seed": 3}, {"chat": True}):
        want = engine.generate(prompt, max_new_tokens=16, **settings).text
        got, _ = _stream(url, prompt, 16, **settings)
        assert got == want, settings
    assert engine.generate(prompt, max_new_tokens=16, stop=[stop]).text != plain  # the stop string did cut it
