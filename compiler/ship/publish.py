"""`kiln publish ARTIFACT REF` and `kiln pull REF DIR`: artifacts in an OCI registry (via ORAS) or
in a directory.

OCI: one layer per file with a kiln media type (engine files, tokenizer files, manifests), a
config blob typed `application/vnd.kiln.artifact.config.v1+json` (the artifact type), and
manifest annotations with the model, backend, precision, targets and quality figures. Loopback
registries are spoken to over plain HTTP, others over HTTPS. Before ORAS is used the registry is
probed (a TCP connect, then `GET /v2/`, both with short timeouts), so an unreachable registry,
missing or refused credentials fail in seconds with one line; every later request has timeouts
too, and is not retried (ORAS would retry each failure for ~130 s): a failure is one line that
names the registry. Credentials come only from the environment (KILN_REGISTRY_USERNAME /
KILN_REGISTRY_PASSWORD) or the docker config; they stay in memory, never logged or written
anywhere (ORAS's login() would store them in the docker config, so it is not used).
A pull reads the registry's manifest and the artifact's kiln.json first (both in memory, capped)
and checks the layers against it: plain file names, each listed with its digest and size, nothing
unlisted, no duplicates. Only then are the blobs streamed into a temp dir beside the destination,
each capped at its listed size; the result is verified and renamed into place (compiler.ship.package
.install). ORAS's own pull is not used: it would write whatever layer titles and sizes the
registry names, and extract tar layers.
A directory REF (`dir:///path` or an existing directory) gets the `kiln package` archive and
SHA256SUMS; pulling from a directory unpacks and verifies them.
"""

from __future__ import annotations

import base64
import functools
import inspect
import io
import json
import os
import re
import shutil
import socket
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlsplit

from compiler.errors import KilnError
from compiler.fsutil import is_file_name
from compiler.runtime.hashing import sha256_chunks
from compiler.runtime.verify import MANIFEST, MAX_MANIFEST_BYTES, ArtifactTampered, listing, verified

CONFIG_TYPE = "application/vnd.kiln.artifact.config.v1+json"
MEDIA = {"engine": "application/vnd.kiln.engine.v1", "tokenizer": "application/vnd.kiln.tokenizer.v1",
         "manifest": "application/vnd.kiln.manifest.v1+json", "file": "application/vnd.kiln.file.v1"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
_ENGINE_FILES = ("model.onnx", "model.onnx.data", "rank0.engine")
_MANIFESTS = (MANIFEST, "engine.json", "README.md")
CONNECT_TIMEOUT_S = 5.0  # the probe's TCP connect, and every request's connect
READ_TIMEOUT_S = 300.0  # between bytes of a response
_CHECK = "check that the registry is running and that the host and port are right"
_OURS = "pull only artifacts written by `kiln publish`"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


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


def _endpoint(host: str) -> tuple[str, int, bool]:
    """(hostname, port, loopback) of 'host[:port]'; loopback registries are spoken to over HTTP."""
    try:
        parts = urlsplit(f"//{host}")
        hostname, port = parts.hostname or "", parts.port
    except ValueError:
        raise KilnError(f"{host!r} is not a registry host", "use HOST[:PORT]/REPO[:TAG]") from None
    loopback = hostname in ("127.0.0.1", "localhost", "::1")
    return hostname, port or (80 if loopback else 443), loopback


def _client(host: str):
    """An ORAS client for host, after the probe; credentials (if any) set in memory only."""
    try:
        import oras.client
    except ImportError:
        raise KilnError("publishing to a registry needs the oras package", "pip install 'kiln[publish]'") from None
    creds = _credentials(host)
    basic = _probe(host, creds)
    client = oras.client.OrasClient(hostname=host, insecure=_endpoint(host)[2], auth_backend="basic" if basic else "token")
    # requests has no session-wide timeout: without one a stalled registry hangs a pull forever
    client.session.request = functools.partial(client.session.request, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    # ORAS wraps do_request in a retry decorator (5 tries, sleeps of 3 to 83 s): use the request itself
    client.do_request = types.MethodType(inspect.unwrap(type(client).do_request), client)
    if creds is not None:
        client.auth.set_basic_auth(creds[0], creds[1])
        client.auth.load_configs = lambda *args, **kwargs: None  # kiln's choice wins over the docker config's entry
        if basic:  # sent up front, so no blob is uploaded twice (once unauthenticated, then again)
            client.session.headers["Authorization"] = _basic_header(creds)
    return client


def _credentials(host: str) -> tuple[str, str, str] | None:
    """(user, password, where they came from): the environment first, then the docker config."""
    user, password = os.environ.get("KILN_REGISTRY_USERNAME"), os.environ.get("KILN_REGISTRY_PASSWORD")
    if user and password:
        return user, password, "KILN_REGISTRY_USERNAME / KILN_REGISTRY_PASSWORD"
    path = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    try:
        auth = json.loads(path.read_text()).get("auths", {}).get(host, {}).get("auth")
        if auth:
            user, _, password = base64.b64decode(auth).decode().partition(":")
            return (user, password, f"the docker config ({path})") if user and password else None
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _basic_header(creds: tuple[str, str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def _probe(host: str, creds: tuple[str, str, str] | None) -> bool:
    """Fail fast, naming what was tried: a TCP connect, then `GET /v2/` (with the credentials, if
    any). Returns True when the registry uses basic auth (else ORAS's token flow is used)."""
    import requests

    hostname, port, loopback = _endpoint(host)
    try:
        socket.create_connection((hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise KilnError(f"registry {host} is not reachable: TCP connect to {hostname}:{port} failed "
                        f"({e.strerror or type(e).__name__}, {CONNECT_TIMEOUT_S:g} s timeout)", _CHECK) from None
    url = f"{'http' if loopback else 'https'}://{host}/v2/"
    headers = {"Authorization": _basic_header(creds)} if creds else {}
    try:
        with requests.get(url, headers=headers, timeout=(CONNECT_TIMEOUT_S, 30), allow_redirects=False) as r:
            scheme = r.headers.get("WWW-Authenticate", "").split(" ", 1)[0].lower()
    except requests.RequestException as e:
        raise KilnError(f"registry {host} did not answer GET {url} ({type(e).__name__})",
                        f"{_CHECK}, and that it speaks {'HTTP' if loopback else 'HTTPS'}") from None
    if r.status_code == 401 and scheme == "basic":
        if creds:
            raise KilnError(f"registry {host} refused the credentials from {creds[2]}", "check the user name and password")
        raise KilnError(f"registry {host} needs credentials",
                        "set KILN_REGISTRY_USERNAME and KILN_REGISTRY_PASSWORD (or log in with `docker login`)")
    if r.status_code not in (200, 401):
        raise KilnError(f"registry {host} answered GET {url} with HTTP {r.status_code}", "check that it is an OCI registry")
    return scheme == "basic" or (creds is not None and r.status_code == 200)


@contextmanager
def _registry_errors(host: str, action: str) -> Iterator[None]:
    """Network and protocol failures inside ORAS -> one line naming the registry."""
    import requests

    try:
        yield
    except requests.RequestException as e:
        raise KilnError(f"registry {host}: {action} failed ({type(e).__name__})", f"{_CHECK}, then retry") from None
    except ValueError as e:  # ORAS raises ValueError for refused requests
        raise KilnError(f"registry {host}: {action} failed ({(str(e).splitlines() or [type(e).__name__])[0][:200]})",
                        "check the reference and the credentials") from None


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def publish(artifact: Path, ref: str) -> dict:
    artifact = Path(artifact)
    manifest = verified(artifact)  # a refusal names the fix
    if is_directory_ref(ref):
        from compiler.ship.package import package

        archive, sums = package(artifact, _dir(ref))
        return {"ref": str(archive), "sha256sums": str(sums)}
    host, target = _split(ref)
    client = _client(host)
    files = [MANIFEST, *sorted(manifest["files"])]
    with tempfile.TemporaryDirectory(prefix="kiln-publish.") as tmp:
        config = Path(tmp) / "kiln-config.json"
        config.write_text(json.dumps({"name": manifest["name"], "kiln_version": manifest["kiln_version"],
                                      "files": manifest["files"]}, sort_keys=True))
        with _cwd(artifact), _registry_errors(host, f"push to {target}"):
            resp = client.push(target=target, files=[f"{f}:{media_type(f)}" for f in files],
                               manifest_config=f"{config}:{CONFIG_TYPE}", manifest_annotations=annotations(manifest),
                               disable_path_validation=True, quiet=True)
    if resp.status_code not in (200, 201):
        raise KilnError(f"registry {host} refused the push ({resp.status_code})", "check the reference and credentials")
    return {"ref": target, "digest": resp.headers.get("Docker-Content-Digest")}


def pull(ref: str, dest_root: Path) -> Path:
    """Fetch into dest_root/<name>, verified before it is renamed into place."""
    from compiler.ship.package import install, unpack

    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    if is_directory_ref(ref) or ref.endswith(".tar.gz"):
        src = Path(ref.removeprefix("dir://"))
        archives = [src] if src.is_file() else sorted(src.glob("*.tar.gz"))
        if len(archives) != 1:
            raise KilnError(f"{ref} holds {len(archives)} archives", "point at one .tar.gz written by kiln publish")
        return unpack(archives[0], dest_root)
    host, target = _split(ref)
    client = _client(host)
    tmp = Path(tempfile.mkdtemp(prefix=".pull.", dir=dest_root))
    try:
        with _registry_errors(host, f"pull of {target}"):
            name = _fetch(client, host, target, tmp)
        return install(tmp, dest_root, name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(client, host: str, target: str, tmp: Path) -> object:
    """The registry manifest and kiln.json, checked against each other, then each listed blob
    into tmp (capped at its listed size). Returns the kiln.json name (checked by install)."""
    container = client.get_container(target)
    client.auth.load_configs(container)  # docker credential helpers, as ORAS's own pull would use
    bad = f"{target} is not a kiln artifact (or was tampered with)"
    with client.do_request(f"{client.prefix}://{container.manifest_url()}", "GET", headers={"Accept": OCI_MANIFEST},
                           stream=True) as r:
        if r.status_code != 200:
            raise KilnError(f"registry {host} has no {target} (HTTP {r.status_code})", "check the reference and its tag")
        by_name = _layers(_json(_read(r, io.BytesIO(), MAX_MANIFEST_BYTES, f"{target}'s manifest").getvalue(), bad), bad)
    if MANIFEST not in by_name or by_name[MANIFEST]["size"] > MAX_MANIFEST_BYTES:
        raise KilnError(f"{bad}: no kiln.json layer (or one over {MAX_MANIFEST_BYTES} bytes)", _OURS)
    raw = _blob(client, container, by_name.pop(MANIFEST), io.BytesIO(), target).getvalue()
    manifest = _json(raw, bad)
    try:
        expected = listing(manifest, target)
    except ArtifactTampered as e:
        raise KilnError(str(e)) from None
    if set(by_name) != set(expected):
        odd = sorted(set(by_name) ^ set(expected))
        raise KilnError(f"{bad}: its layers and its kiln.json disagree on {', '.join(odd[:3])}", "re-publish the artifact")
    for name, layer in by_name.items():
        if layer["size"] != expected[name].size or layer["digest"] != f"sha256:{expected[name].sha256}":
            raise KilnError(f"{bad}: the layer {name} is not the file kiln.json lists (size or digest)", "re-publish the artifact")
    (tmp / MANIFEST).write_bytes(raw)
    for name, layer in sorted(by_name.items()):
        with open(tmp / name, "xb") as out:
            _blob(client, container, layer, out, target)
    return manifest.get("name")


def _layers(manifest: dict, bad: str) -> dict[str, dict]:
    """{title: layer} of an OCI manifest, each title a plain file name, once, with kiln's media
    types and a sha256 digest and integer size."""
    layers, out = manifest.get("layers"), {}
    if not isinstance(layers, list):
        raise KilnError(f"{bad}: its manifest has no layers", _OURS)
    for layer in layers:
        title = (layer.get("annotations") or {}).get(TITLE) if isinstance(layer, dict) else None
        if not is_file_name(title) or title in out or layer.get("mediaType") not in MEDIA.values() \
                or not _DIGEST.fullmatch(str(layer.get("digest"))) or type(layer.get("size")) is not int:
            raise KilnError(f"{bad}: the layer titled {title!r} is not a plain file name, is a duplicate, "
                            "or has another media type, digest or size than kiln writes", _OURS)
        out[title] = layer
    return out


def _blob(client, container, layer: dict, out: BinaryIO, target: str) -> BinaryIO:
    """Stream one layer's blob into out, at most its size; checks its sha256."""
    title = f"{target}: {layer['annotations'][TITLE]}"
    with client.get_blob(container, layer["digest"], stream=True) as r:
        if r.status_code != 200:
            raise KilnError(f"registry {container.registry} has no blob for {title} (HTTP {r.status_code})", "re-publish the artifact")
        digest = sha256_chunks(_copied(r, out, layer["size"], title))
    if out.tell() != layer["size"] or f"sha256:{digest}" != layer["digest"]:
        raise KilnError(f"the blob for {title} is not the one its manifest names (size or digest)", "re-publish the artifact")
    return out


def _read(r, out: BinaryIO, cap: int, what: str) -> BinaryIO:
    """Copy a streamed response into out, refusing more than cap bytes."""
    for _ in _copied(r, out, cap, what):
        pass
    return out


def _copied(r, out: BinaryIO, cap: int, what: str) -> Iterator[bytes]:
    """A streamed response's chunks, each written to out as it passes; refuses more than cap bytes."""
    n = 0
    for chunk in r.iter_content(1 << 20):
        n += len(chunk)
        if n > cap:
            raise KilnError(f"{what} is over the {cap} bytes it may have", "re-publish the artifact")
        out.write(chunk)
        yield chunk


def _json(raw: bytes, bad: str) -> dict:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise KilnError(f"{bad}: a manifest is not a JSON object", _OURS)
    return value
