"""`make publish` helper: verify a pulled artifact, load it and ask it for a few tokens (or one
embedding). A TensorRT engine is verified only: loading it needs its GPU. A multi-rank engine
runs through `kiln run`, which starts its ranks."""

import json
import subprocess
import sys
from pathlib import Path

from compiler.runtime import load
from compiler.runtime.launch import world_size
from compiler.runtime.verify import verify_artifact

path = Path(sys.argv[1])
verify_artifact(path)
if json.loads((path / "engine.json").read_text())["backend"] == "tensorrt":
    print(f"{path.name}: verified (TensorRT engine: loading it needs an NVIDIA GPU)")
elif world_size(path) > 1:
    out = subprocess.run([sys.executable, "-m", "compiler.cli", "run", str(path), "--prompt", "Hello", "--max-new-tokens", "8",
                          "--json"], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    print(f"{path.name}: verified, loaded on {world_size(path)} ranks, generated {json.loads(out)['text']!r}")
else:
    e = load(path)
    out = e.embed("hello").shape if hasattr(e, "embed") else repr(e.generate("Hello", max_new_tokens=8).text)
    print(f"{path.name}: verified, loaded, generated {out}")
