"""`kiln publish ARTIFACT REF` and `kiln pull REF DIR`: artifacts in an OCI registry (via ORAS) or
in a directory.

OCI: one layer per file with a kiln media type (engine files, tokenizer files, manifests), a
config blob typed `application/vnd.kiln.artifact.config.v1+json` (the artifact type), and
manifest annotations with the model, backend, precision, targets and quality figures. Loopback
registries are spoken to over plain HTTP, others over HTTPS. Credentials come only from the
environment (KILN_REGISTRY_USERNAME / KILN_REGISTRY_PASSWORD) or the docker config; they are
never logged or written anywhere. A pull lands in a temp dir, is verified against its kiln.json
and only then renamed into place.
A directory REF (`dir:///path` or an existing directory) gets the `kiln package` archive and
SHA256SUMS; pulling from a directory unpacks and verifies them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from compiler.errors import KilnError
from compiler.runtime.verify import ArtifactTampered, verify_artifact

CONFIG_TYPE = "application/vnd.kiln.artifact.config.v1+json"
MEDIA = {"engine": "application/vnd.kiln.engine.v1", "tokenizer": "application/vnd.kiln.tokenizer.v1",
         "manifest": "application/vnd.kiln.manifest.v1+json", "file": "application/vnd.kiln.file.v1"}
_ENGINE_FILES = ("model.onnx", "model.onnx.data", "rank0.engine")
_MANIFESTS = ("kiln.json", "engine.json", "README.md")


def media_type(name: str) -> str:
    if name in _ENGINE_FILES:
        return MEDIA["engine"]
    if name in _MANIFESTS:
        return MEDIA["manifest"]
    if name.startswith("tokenizer") or name in ("chat_template.jinja", "generation_config.json", "special_tokens_map.json"):
        return MEDIA["tokenizer"]
    return MEDIA["file"]


def annotations(manifest: dict) -> dict[str, str]:
    b, q = manifest["backend"], manifest.get("quality") or {}
    quant = manifest.get("quantization") or {}
    out = {"org.opencontainers.image.title": manifest["name"], "dev.kiln.model": manifest["source"]["architecture"],
           "dev.kiln.source-digest": manifest["source"]["digest"], "dev.kiln.backend": f"{b['name']} {b['version']}",
           "dev.kiln.precision": b.get("precision") or (quant.get("scheme") or manifest["recipe"]["dtype"]),
           "dev.kiln.targets": ",".join(b.get("targets") or []) or "cpu", "dev.kiln.version": manifest["kiln_version"]}
    for k in ("perplexity", "reference_perplexity", "ppl_increase_pct", "top1_agreement", "mean_kl"):
        if k in q:
            out[f"dev.kiln.quality.{k}"] = f"{q[k]:.6g}"
    return out


def is_directory_ref(ref: str) -> bool:
    return ref.startswith("dir://") or Path(ref).is_dir()


def _dir(ref: str) -> Path:
    return Path(ref[len("dir://"):] if ref.startswith("dir://") else ref)


def _split(ref: str) -> tuple[str, str]:
    """'host[:port]/repo[:tag]' (optionally oci://) -> (host, full target)."""
    ref = ref.removeprefix("oci://")
    host, _, path = ref.partition("/")
    if not path or ("." not in host and ":" not in host and host != "localhost"):
        raise KilnError(f"{ref!r} is not a registry reference", "use HOST[:PORT]/REPO[:TAG] (e.g. 127.0.0.1:5000/models/x:v1) or dir://PATH")
    return host, f"{host}/{path if ':' in path.rsplit('/', 1)[-1] else path + ':latest'}"


def _client(host: str):
    try:
        import oras.client
    except ImportError:
        raise KilnError("publishing to a registry needs the oras package", "pip install 'kiln[publish]'") from None
    loopback = host.split(":")[0] in ("127.0.0.1", "localhost", "::1")
    client = oras.client.OrasClient(hostname=host, insecure=loopback)
    user, password = os.environ.get("KILN_REGISTRY_USERNAME"), os.environ.get("KILN_REGISTRY_PASSWORD")
    if not (user and password):
        user, password = _docker_credentials(host)
    if user and password:
        client.login(username=user, password=password, hostname=host, insecure=loopback)
    return client


def _docker_credentials(host: str) -> tuple[str | None, str | None]:
    """user and password for host from the docker config (`auths.<host>.auth`, base64 user:pass)."""
    import base64

    path = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    try:
        auth = json.loads(path.read_text()).get("auths", {}).get(host, {}).get("auth")
        if auth:
            user, _, password = base64.b64decode(auth).decode().partition(":")
            return user, password
    except (OSError, ValueError):
        pass
    return None, None


@contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def publish(artifact: Path, ref: str) -> dict:
    artifact = Path(artifact)
    try:
        verify_artifact(artifact)
    except ArtifactTampered as e:
        raise KilnError(str(e), "rebuild the artifact before publishing it") from None
    manifest = json.loads((artifact / "kiln.json").read_text())
    if is_directory_ref(ref):
        from compiler.package import package

        archive, sums = package(artifact, _dir(ref))
        return {"ref": str(archive), "sha256sums": str(sums)}
    host, target = _split(ref)
    client = _client(host)
    files = sorted(p.name for p in artifact.iterdir() if p.is_file())
    with tempfile.TemporaryDirectory(prefix="kiln-publish.") as tmp:
        config = Path(tmp) / "kiln-config.json"
        config.write_text(json.dumps({"name": manifest["name"], "kiln_version": manifest["kiln_version"],
                                      "files": manifest["files"]}, sort_keys=True))
        with _cwd(artifact):
            resp = client.push(target=target, files=[f"{f}:{media_type(f)}" for f in files],
                               manifest_config=f"{config}:{CONFIG_TYPE}", manifest_annotations=annotations(manifest),
                               disable_path_validation=True, quiet=True)
    if resp.status_code not in (200, 201):
        raise KilnError(f"registry {host} refused the push ({resp.status_code})", "check the reference and credentials")
    return {"ref": target, "digest": resp.headers.get("Docker-Content-Digest")}


def pull(ref: str, dest_root: Path) -> Path:
    """Fetch into dest_root/<name>, verified before it is renamed into place."""
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    if is_directory_ref(ref) or ref.endswith(".tar.gz"):
        from compiler.package import unpack

        src = Path(ref.removeprefix("dir://"))
        archives = [src] if src.is_file() else sorted(src.glob("*.tar.gz"))
        if len(archives) != 1:
            raise KilnError(f"{ref} holds {len(archives)} archives", "point at one .tar.gz written by kiln publish")
        return unpack(archives[0], dest_root)
    host, target = _split(ref)
    client = _client(host)
    tmp = Path(tempfile.mkdtemp(prefix=".pull.", dir=dest_root))
    try:
        client.pull(target=target, outdir=str(tmp))
        name = json.loads((tmp / "kiln.json").read_text())["name"]
        verify_artifact(tmp)
        dest = dest_root / name
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        return dest
    except (ArtifactTampered, FileNotFoundError) as e:
        raise KilnError(f"pulled {target} but it does not verify: {e}", "re-publish the artifact") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
