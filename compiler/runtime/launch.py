"""Start the ranks of a multi-rank engine on this machine: one process per rank, gloo on loopback.

`kiln run ARTIFACT` calls `launch()` when the artifact has several ranks and no process group
is set up: each rank re-runs the same command with the torch.distributed environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that torchrun would set, so
the same command also runs under torchrun across machines. Rank 0 owns the terminal; the
others' output goes to a log, whose last line is shown if that rank fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compiler.runtime.manifest import read_engine


def world_size(artifact: str | Path) -> int:
    """Ranks of an artifact (1 for single-rank ones), from engine.json."""
    try:
        parallel = read_engine(Path(artifact)).parallel
    except (OSError, ValueError):  # not an artifact: load() says so
        return 1
    return 1 if parallel is None else parallel.world_size


def inside_group() -> bool:
    """True when this process is a rank already (launched by launch() or torchrun)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str], timeout: float | None = None) -> int:
    """Run `python argv...` as `world` ranks; returns rank 0's exit code (or the first failure's)."""
    port = _free_port()
    logs = Path(tempfile.mkdtemp(prefix="kiln-ranks-"))
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        out = None if r == 0 else open(logs / f"rank{r}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        return _wait(procs, logs, deadline)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait(procs: list[subprocess.Popen], logs: Path, deadline: float | None) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
        if failed is not None:
            if failed > 0:
                lines = (logs / f"rank{failed}.log").read_text().strip().splitlines()
                print(f"kiln: rank {failed} failed: {lines[-1] if lines else 'no output'}", file=sys.stderr)
            return codes[failed]
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print("kiln: ranks timed out", file=sys.stderr)
            return 124
        time.sleep(0.05)
