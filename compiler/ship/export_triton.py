"""`kiln export triton ARTIFACT --repo DIR`: a Triton Inference Server model repository.

DIR/<name>/config.pbtxt and DIR/<name>/1/model.py are rendered from jinja2 templates; the model
is a python-backend model that loads the artifact with the kiln runtime (decoupled streaming by
default, instance count, threads and request batching from the options). The artifact is
referenced by its absolute path, or copied into the model directory with copy=True.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2

from compiler.errors import KilnError
from compiler.runtime.manifest import read_engine
from compiler.runtime.verify import verified

TEMPLATES = Path(__file__).with_name("templates")
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding compiler/ (this file is compiler/ship/)


@dataclass(frozen=True)
class TritonOptions:
    name: str | None = None  # model name in Triton (default: the artifact's name)
    instances: int = 1
    threads: int = 0  # intra-op threads per instance (0: physical cores)
    max_batch: int = 4  # requests generated together
    decoupled: bool = True  # stream text pieces as they are produced
    copy: bool = False  # copy the artifact into the model directory


def export(artifact: Path, repo: Path, opts: TritonOptions = TritonOptions()) -> Path:
    artifact = Path(artifact).resolve()
    verified(artifact, fix="rebuild the artifact before exporting it")
    engine = read_engine(artifact)
    if engine.task != "generate":
        raise KilnError(f"{artifact.name} is not a text generator", "export decoder artifacts to Triton")
    name = opts.name or artifact.name.replace(".", "_")
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    target = artifact
    if opts.copy:
        target = model_dir / "1" / "artifact"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(artifact, target)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True, autoescape=False)
    (model_dir / "config.pbtxt").write_text(env.get_template("triton_config.pbtxt.j2").render(
        name=name, artifact=str(target), artifact_name=artifact.name, instances=opts.instances, threads=opts.threads,
        max_batch=min(opts.max_batch, engine.max_batch), decoupled=opts.decoupled))
    repo_root = str(REPO_ROOT) if (REPO_ROOT / "compiler").is_dir() else None
    (model_dir / "1" / "model.py").write_text(env.get_template("triton_model.py.j2").render(repo_root=repo_root))
    return model_dir


def pytriton_server(repo: Path, backends: Path, ports: tuple[int, int, int]) -> tuple[list[str], dict]:
    """argv and environment to start the `tritonserver` shipped in the nvidia-pytriton wheel on
    repo, without Docker: its python backend gets the stub for this Python copied into
    `backends` (a writable copy), the wheel's libraries and this Python's libpython on the
    library path, and this environment's packages on PYTHONPATH. ports: http, grpc, metrics."""
    import os
    import site
    import sys
    import sysconfig

    try:
        import pytriton
    except ImportError:
        raise KilnError("starting Triton locally needs the nvidia-pytriton wheel", "pip install nvidia-pytriton") from None
    server = Path(pytriton.__file__).parent / "tritonserver"
    shutil.rmtree(backends, ignore_errors=True)
    shutil.copytree(server / "backends", backends)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(server / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    libs = [str(server.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(filter(None, [*libs, os.environ.get("LD_LIBRARY_PATH", "")])),
           "PYTHONHOME": sys.base_prefix, "PYTHONPATH": ":".join([*site.getsitepackages(), str(REPO_ROOT)])}
    http, grpc, metrics = ports
    argv = [str(server / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
            f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--log-verbose=0"]
    return argv, env
