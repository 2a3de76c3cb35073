"""Publishing round trips against the real thing: Debian's docker-registry on loopback (OCI, via
ORAS) and a directory; pulls are verified before they land, and a damaged archive is refused."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from compiler.cli import main
from compiler.errors import KilnError
from compiler.publish import pull
from compiler.runtime import load

REGISTRY = shutil.which("docker-registry") or shutil.which("registry")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    if REGISTRY is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    root = tmp_path_factory.mktemp("registry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / "config.yml").write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                                     f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen([REGISTRY, "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v2/"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def artifact(tiny_artifacts):
    return tiny_artifacts[("llama", "contrib")]


def test_registry_round_trip(registry, artifact, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KILN_REGISTRY_PASSWORD", "s3cret-not-used")  # without a user: not sent, never written
    ref = f"{registry}/kiln/tiny-llama:v1"
    assert main(["publish", str(artifact), ref]) == 0
    assert "s3cret" not in capsys.readouterr().out
    req = urllib.request.Request(f"http://{registry}/v2/kiln/tiny-llama/manifests/v1",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    manifest = json.loads(urllib.request.urlopen(req).read())
    assert manifest["config"]["mediaType"] == "application/vnd.kiln.artifact.config.v1+json"
    types = {layer["annotations"]["org.opencontainers.image.title"]: layer["mediaType"] for layer in manifest["layers"]}
    assert types["model.onnx.data"] == "application/vnd.kiln.engine.v1"
    assert types["tokenizer.json"] == "application/vnd.kiln.tokenizer.v1" and types["kiln.json"].endswith("manifest.v1+json")
    notes = manifest["annotations"]
    assert notes["dev.kiln.model"] == "LlamaForCausalLM" and notes["dev.kiln.backend"].startswith("onnxruntime")
    assert "s3cret" not in json.dumps(manifest)

    out = pull(ref, tmp_path / "pulled")
    engine = load(out)  # verified again on load
    assert engine.generate("Hello", max_new_tokens=6).token_ids == load(artifact).generate("Hello", max_new_tokens=6).token_ids


def test_directory_round_trip_and_damaged_archive(artifact, tmp_path):
    assert main(["publish", str(artifact), f"dir://{tmp_path / 'dist'}"]) == 0
    out = pull(f"dir://{tmp_path / 'dist'}", tmp_path / "pulled")
    assert load(out).generate("Hi", max_new_tokens=3).token_ids
    archive = next((tmp_path / "dist").glob("*.tar.gz"))
    shutil.rmtree(out)
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # damage inside the compressed model data
    archive.write_bytes(bytes(raw))
    with pytest.raises((KilnError, OSError, EOFError)):
        pull(str(archive), tmp_path / "again")
    assert not (tmp_path / "again" / out.name).exists()


def test_bad_reference_is_a_clear_error(artifact, capsys):
    assert main(["publish", str(artifact), "not-a-registry"]) == 2
    assert "HOST[:PORT]/REPO[:TAG]" in capsys.readouterr().err


def test_make_publish_round_trip(registry):
    """`make publish`: every built artifact is published, pulled back, verified, loaded and run."""
    from tests.conftest import ROOT, SMOLLM2_DIR

    if shutil.which("make") is None or not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip("needs make and `make model`")
    subprocess.run(["make", "-s", "smollm2-135m"], cwd=ROOT, check=True, capture_output=True)
    out = subprocess.run(["make", "-s", "publish", f"PUBLISH={registry}/ci", "TAG=t1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "smollm2-135m: verified, loaded, generated" in out.stdout
