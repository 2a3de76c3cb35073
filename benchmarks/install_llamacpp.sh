#!/usr/bin/env bash
# Install llama.cpp's Python binding (llama-cpp-python, built from its sdist with the machine's
# compiler: cmake and a C++ compiler, about ten minutes on 2 cores) into its own venv
# (.cache/peers/llamacpp): the reference peer of `make bench` for engines built from GGUF files.
# Built for this machine's AVX-512 (VNNI, BF16) without AMX: the native build (GGML_NATIVE, which
# turns on AMX_INT8) of 0.3.36 segfaults in its first decode on a Xeon with AMX (seen 2026-12-02).
# Idempotent: exits 0 at once when the venv already imports llama_cpp.
# Usage: benchmarks/install_llamacpp.sh [VENV_DIR]      (PYTHON=python3.x to pick the interpreter)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.cache/peers/llamacpp}"
PY="${PYTHON:-python3}"
VERSION=0.3.36

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python already installed in $VENV"; exit 0
fi
mkdir -p "$(dirname "$VENV")"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF" \
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir "llama-cpp-python==$VERSION" numpy
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'in $VENV')"
