"""Registry helpers: Debian's docker-registry on loopback, open or behind htpasswd auth, and a raw
OCI push that writes whatever manifest a test crafts (what a hostile registry would serve)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from compiler.ship.publish import CONFIG_TYPE, media_type

OCI_MANIFEST, TITLE = "application/vnd.oci.image.manifest.v1+json", "org.opencontainers.image.title"  # the OCI spec's
REGISTRY = shutil.which("docker-registry") or shutil.which("registry")
USER, PASSWORD = "kiln-ci", "pa55-w0rd-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(root: Path, auth: str = ""):
    """Start docker-registry on a free loopback port; yields 'host:port' until the test module ends."""
    if REGISTRY is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    port = free_port()
    (root / "config.yml").write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                                     f"http:\n  addr: 127.0.0.1:{port}\n{auth}")
    proc = subprocess.Popen([REGISTRY, "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except urllib.error.HTTPError:  # 401: up, and asking for credentials
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def push_raw(registry: str, repo: str, layers: list[tuple[str, bytes]], tag: str = "v1", sizes: dict | None = None) -> str:
    """Push layers (title, bytes) as an OCI manifest without any client-side checks; sizes
    overrides a layer's declared size. Returns the reference."""
    def blob(data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        loc = urllib.request.urlopen(urllib.request.Request(f"http://{registry}/v2/{repo}/blobs/uploads/", method="POST"))
        url = loc.headers["Location"]
        url = (url if url.startswith("http") else f"http://{registry}{url}") + ("&" if "?" in url else "?") + f"digest={digest}"
        urllib.request.urlopen(urllib.request.Request(url, data=data, method="PUT",
                                                      headers={"Content-Type": "application/octet-stream"}))
        return {"digest": digest, "size": len(data)}

    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": CONFIG_TYPE, **blob(b"{}")},
                "layers": [{"mediaType": media_type(Path(t).name), **blob(d), "annotations": {TITLE: t}} for t, d in layers]}
    for layer in manifest["layers"]:
        layer["size"] = (sizes or {}).get(layer["annotations"][TITLE], layer["size"])
    urllib.request.urlopen(urllib.request.Request(f"http://{registry}/v2/{repo}/manifests/{tag}", method="PUT",
                                                  data=json.dumps(manifest).encode(), headers={"Content-Type": OCI_MANIFEST}))
    return f"{registry}/{repo}:{tag}"


def artifact_layers(artifact: Path, **kiln_json) -> list[tuple[str, bytes]]:
    """An artifact's files as layers, kiln.json first, with kiln_json's fields overriding its own."""
    manifest = {**json.loads((artifact / "kiln.json").read_text()), **kiln_json}
    files = [(f.name, f.read_bytes()) for f in sorted(artifact.iterdir()) if f.name != "kiln.json"]
    return [("kiln.json", json.dumps(manifest).encode()), *files]
