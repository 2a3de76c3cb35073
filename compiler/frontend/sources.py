"""Where a recipe's `source` points: a checkpoint directory, `hf://org/name[@revision]`, or a GGUF file;
and its `adapters` (directories or hf:// repos of PEFT LoRA adapters), opened with it by
`open_source`.

Hub sources are fetched with huggingface_hub (safetensors, JSON and tokenizer files only; never
pickles) into its cache; `HF_ENDPOINT` points it elsewhere (the tests use a local fake hub).
GGUF files are imported once into kiln's cache (`KILN_CACHE`, default `~/.cache/kiln`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from compiler.errors import KilnError
from compiler.frontend.adapters import Adapter
from compiler.frontend.checkpoint import Checkpoint

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def cache_root() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))


def resolve_source(source: str) -> Path:
    if source.startswith("hf://"):
        return _from_hub(source[len("hf://"):])
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return _from_gguf(path)
    if not path.exists():
        raise KilnError(f"source {source} does not exist", "point 'source' at a checkpoint directory, a .gguf file or hf://org/name")
    return path


def open_source(source: str, adapters: list[tuple[str, str]] = ()):
    """(the checkpoint's directory, the Checkpoint with the adapters (name, path) merged as it is read)."""
    root = resolve_source(source)
    ckpt = Checkpoint.open(root)
    if adapters:
        ckpt = ckpt.with_adapters([Adapter.open(name, _adapter_dir(path), ckpt) for name, path in adapters])
    return root, ckpt


def _adapter_dir(path: str) -> Path:
    if path.startswith("hf://"):
        return _from_hub(path[len("hf://"):])
    p = Path(path).expanduser()
    if not p.is_dir():
        raise KilnError(f"adapter {path} is not a directory", "point adapters[].path at a PEFT adapter directory or hf://org/name")
    return p


def _from_hub(ref: str) -> Path:
    repo, _, revision = ref.partition("@")
    if repo.count("/") != 1:
        raise KilnError(f"hub source hf://{ref} is not of the form hf://org/name[@revision]", "fix the recipe's source")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise KilnError("hf:// sources need huggingface_hub", "pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"could not fetch hf://{ref}: {first}", "check the name, network and HF_TOKEN") from None


def _from_gguf(path: Path) -> Path:
    if not path.is_file():
        raise KilnError(f"GGUF file {path} does not exist", "fix the recipe's source")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{path.stem}-{key}"
    if not (out / "config.json").is_file():
        from compiler.frontend.gguf_import import import_gguf

        out.parent.mkdir(parents=True, exist_ok=True)
        import_gguf(path, out)
    return out
