"""Publishing round trips against the real thing: Debian's docker-registry on loopback (OCI, via
ORAS; open, and behind htpasswd auth) and a directory; pulls are verified before they land, a
damaged archive is refused, and an unreachable registry or wrong password fails in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from compiler.cli import main
from compiler.errors import KilnError
from compiler.ship.publish import pull
from compiler.runtime import load
from tests.ship.publish.registry import PASSWORD, USER, free_port


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


def _one_line(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kiln: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def no_docker_config(tmp_path, monkeypatch):
    """An empty HOME and DOCKER_CONFIG: whatever a run writes there is seen (and none is read)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DOCKER_CONFIG", str(home / ".docker"))
    return home


def test_authenticated_publish_and_pull(auth_registry, artifact, tmp_path, capsys, monkeypatch, no_docker_config):
    """Issue 13 #4: login crashed (oras has no `insecure=` on login); credentials stay in memory."""
    monkeypatch.setenv("KILN_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("KILN_REGISTRY_PASSWORD", PASSWORD)
    ref = f"{auth_registry}/kiln/private:v1"
    assert main(["publish", str(artifact), ref]) == 0
    assert main(["pull", ref, str(tmp_path / "pulled")]) == 0
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err
    assert load(tmp_path / "pulled" / "llama-contrib").generate("Hi", max_new_tokens=3).token_ids
    assert list(no_docker_config.rglob("*")) == []  # no docker config written (oras's login() would)


def test_wrong_or_missing_credentials_are_one_line(auth_registry, artifact, tmp_path, capsys, monkeypatch, no_docker_config):
    ref = f"{auth_registry}/kiln/private:v2"
    t0 = time.monotonic()
    _one_line(capsys, ["publish", str(artifact), ref], "needs credentials", "KILN_REGISTRY_USERNAME")
    monkeypatch.setenv("KILN_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("KILN_REGISTRY_PASSWORD", "not-the-" + PASSWORD)
    err = _one_line(capsys, ["publish", str(artifact), ref], f"registry {auth_registry} refused the credentials")
    err += _one_line(capsys, ["pull", ref, str(tmp_path / "pulled")], "refused the credentials")
    assert PASSWORD not in err and USER not in err
    assert time.monotonic() - t0 < 10 and not (tmp_path / "pulled" / "llama-contrib").exists()


def test_unreachable_registry_fails_fast(artifact, tmp_path, capsys):
    """Issue 13 #11: 132 s of retries, then a traceback; now one line naming what was tried."""
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    _one_line(capsys, ["pull", f"{host}/kiln/x:v1", str(tmp_path / "d")], f"registry {host} is not reachable", "TCP connect")
    _one_line(capsys, ["publish", str(artifact), f"{host}/kiln/x:v1"], "is not reachable", "check that the registry is running")
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())

