"""`make publish` helper: verify a pulled artifact, load it and ask it for a few tokens (or one
embedding). A TensorRT engine is verified only: loading it needs its GPU."""

import json
import sys
from pathlib import Path

from compiler.runtime import load
from compiler.runtime.verify import verify_artifact

path = Path(sys.argv[1])
verify_artifact(path)
if json.loads((path / "engine.json").read_text())["backend"] == "tensorrt":
    print(f"{path.name}: verified (TensorRT engine: loading it needs an NVIDIA GPU)")
else:
    e = load(path)
    out = e.embed("hello").shape if hasattr(e, "embed") else repr(e.generate("Hello", max_new_tokens=8).text)
    print(f"{path.name}: verified, loaded, generated {out}")
