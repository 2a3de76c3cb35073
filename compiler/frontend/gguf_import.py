"""Import a GGUF file (llama.cpp format) as a plain Hugging Face checkpoint directory.

transformers' GGUF loader does the hard parts: dequantising every tensor to fp32, mapping
llama.cpp tensor names to HF names (undoing the Q/K rotary permutation) and converting the
embedded tokenizer. What it will not do is `save_pretrained` a model loaded that way, so this
module drives its pieces directly and writes the result itself:

    config.json             model config without `quantization_config`, dtype float32
    model.safetensors       dense fp32 weights under HF names (no lm_head when tied)
    generation_config.json  bos/eos/pad ids from the GGUF metadata
    tokenizer.json, tokenizer_config.json, chat_template.jinja   (as transformers saves them)

The output appears atomically: everything is written into a hidden temp dir next to
`out_dir` and renamed into place at the end; on failure the temp dir is removed.
torch/transformers are imported lazily so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import sys
import uuid
from pathlib import Path

from compiler.errors import KilnError

_GGUF_MAGIC = b"GGUF"


def import_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Convert `gguf_path` into an HF checkpoint dir at `out_dir` and return `out_dir`."""
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir).resolve()
    if not gguf_path.is_file():
        raise KilnError(f"GGUF file not found: {gguf_path}", "check the path to the .gguf file")
    with open(gguf_path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise KilnError(f"{gguf_path} is not a GGUF file (magic {magic!r}, expected b'GGUF')",
                        "pass a llama.cpp .gguf model file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise KilnError(f"output directory already exists and is not empty: {out_dir}",
                        "remove it or choose another output directory")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: the final dir should get normal (umask) permissions
    try:
        with _status(progress, f"Importing {gguf_path.name}") as status:
            _convert(gguf_path, tmp, status)
        os.replace(tmp, out_dir)  # an existing *empty* out_dir is replaced (POSIX rename)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _convert(gguf_path: Path, tmp: Path, status) -> None:
    import gguf

    status("Reading metadata")
    try:
        reader = gguf.GGUFReader(gguf_path)
        arch = str(reader.fields["general.architecture"].contents())
    except Exception as e:  # truncated or malformed file behind a valid magic
        raise KilnError(f"cannot read GGUF file {gguf_path}: {_one_line(e)}",
                        "re-download or re-export the .gguf file") from e

    status("Loading transformers")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    src_dir, name = str(gguf_path.parent), gguf_path.name
    supported = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata sections
    # tqdm bars and chatter from transformers are kept off the terminal
    with _gguf_memo(gguf, gguf_path, reader), contextlib.redirect_stderr(io.StringIO()):
        status("Reading config")
        try:
            config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise KilnError(
                f"transformers cannot load GGUF architecture '{arch}' as a causal LM: {_one_line(e)}",
                f"supported GGUF architectures: {', '.join(sorted(supported))}") from e

        status("Converting tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        tokenizer.save_pretrained(tmp)
        del tokenizer

        status("Dequantising weights")
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton,
                                       torch_dtype=torch.float32)["tensors"]
    del reader

    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise KilnError(f"GGUF tensors do not match the {arch} model transformers builds (e.g. {diff})",
                        "this GGUF variant is not supported by kiln's importer")

    status("Writing model.safetensors")
    _write_safetensors(tmp / "model.safetensors", tensors)
    del tensors

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.float32
    config.save_pretrained(tmp)
    gen = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**{k: v for k, v in gen.items() if v is not None}).save_pretrained(tmp)


def _write_safetensors(path: Path, tensors: dict) -> None:
    """Stream fp32 tensors to a .safetensors file, freeing each one once it is written.

    safetensors' own save_file first copies every tensor into a bytes object (twice the
    weights in RAM); the format is simple enough to write directly.
    """
    names = sorted(tensors)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for n in names:
        size = tensors[n].numel() * 4
        header[n] = {"dtype": "F32", "shape": list(tensors[n].shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for n in names:
            t = tensors.pop(n)
            f.write(memoryview(t.float().contiguous().numpy()).cast("B"))
            del t


@contextlib.contextmanager
def _gguf_memo(gguf_module, path: Path, reader):
    """Within the block, `gguf.GGUFReader(path)` returns `reader` and `get_tensor_name_map`
    is memoised. transformers calls both afresh per use (the reader re-parses ~4 s of
    metadata; the name map is rebuilt for each of the ~400 submodules), and looks them up
    on the gguf module at call time. If that ever changes this is merely a no-op."""
    real_reader, real_map = gguf_module.GGUFReader, gguf_module.get_tensor_name_map
    maps: dict = {}

    def reader_for(p, *args, **kwargs):
        if not args and not kwargs and Path(p).resolve() == path:
            return reader
        return real_reader(p, *args, **kwargs)

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = real_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf_module.GGUFReader, gguf_module.get_tensor_name_map = reader_for, name_map
    try:
        yield
    finally:
        gguf_module.GGUFReader, gguf_module.get_tensor_name_map = real_reader, real_map


@contextlib.contextmanager
def _status(progress: bool, text: str):
    """Yield `update(msg)`; with progress=True show it as a rich spinner on stderr."""
    if not progress:
        yield lambda msg: None
        return
    try:
        from rich.console import Console
    except ImportError:
        yield lambda msg: None
        return
    # bind the real stderr now: transformers' own output is redirected away while we run
    with Console(file=sys.stderr).status(text) as live:
        yield lambda msg: live.update(f"{text}: {msg}")


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0].rstrip(".") if lines else type(e).__name__)[:200]
