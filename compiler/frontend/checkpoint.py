"""A Hugging Face checkpoint directory, read lazily.

`Checkpoint.open(dir)` checks `config.json`, finds the weights (`model.safetensors`, or a
sharded set with `model.safetensors.index.json`) and parses every header, so bad input fails
before the build starts. Weights are read one at a time (`checkpoint.read(name)`), each a
copy read on demand, so peak memory stays near the largest single tensor.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compiler.errors import KilnError
from compiler.frontend.adapters import Adapter, merged
from compiler.frontend.safetensors_file import SafetensorsFile, TensorInfo
from compiler.runtime.hashing import file_chunks, sha256_chunks

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KilnError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})", "fix or re-download the file") from None
    if not isinstance(data, dict):
        raise KilnError(f"{path} must hold a JSON object", "fix or re-download the file")
    return data


@dataclass
class Checkpoint:
    root: Path
    config: dict
    generation_config: dict
    files: list[SafetensorsFile]
    index: dict[str, SafetensorsFile] = field(default_factory=dict)
    claimed: set[str] = field(default_factory=set)  # weights a graph builder has asked for (weights.Weights)
    adapters: list[Adapter] = field(default_factory=list)  # LoRA adapters merged as weights are read

    @classmethod
    def open(cls, root: str | Path) -> "Checkpoint":
        root = Path(root)
        if not root.is_dir():
            raise KilnError(f"checkpoint directory {root} does not exist", "pass a Hugging Face checkpoint directory")
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise KilnError(f"{root} has no config.json", "point the recipe's source at a Hugging Face checkpoint directory")
        config = _load_json(cfg_path)
        gen_path = root / "generation_config.json"
        gen = _load_json(gen_path) if gen_path.is_file() else {}
        files = [SafetensorsFile(p) for p in _weight_files(root)]
        index = {name: f for f in files for name in f.tensors}
        return cls(root, config, gen, files, index)

    def names(self) -> list[str]:
        return list(self.index)

    def has(self, name: str) -> bool:
        return name in self.index

    def info(self, name: str) -> TensorInfo:
        return self.index[name].tensors[name]

    def read(self, name: str) -> np.ndarray:
        w = self.index[name].read(name)
        return merged(name, w, self.adapters) if self.adapters else w

    def with_adapters(self, adapters: list[Adapter]) -> "Checkpoint":
        """The same checkpoint, its weights read with the adapters merged in (frontend/adapters.py)."""
        return Checkpoint(self.root, self.config, self.generation_config, self.files, self.index, set(), list(adapters))

    def pruned(self, config: dict, slices: dict[str, tuple[int, np.ndarray]],
               sources: dict[str, str] | None = None) -> "Checkpoint":
        """A view with `config`; its weights are `sources` (view name -> checkpoint name; default:
        every weight under its own name) and, for each view name in `slices`, only the indices kept
        along one axis (structured pruning: passes/prune.py)."""
        sources = {n: n for n in self.index} if sources is None else dict(sources)
        return PrunedCheckpoint(self.root, config, self.generation_config, self.files, self.index, set(),
                                self.adapters, dict(slices), sources)

    def hashed_files(self) -> list[Path]:
        """What the digest covers: config, weights, tokenizer files, and each adapter's two files."""
        extra = [p for a in self.adapters for p in (a.root / "adapter_config.json", a.file.path)]
        return sorted({self.root / "config.json", *(f.path for f in self.files), *self.tokenizer_files(), *extra})

    def check_all_claimed(self, ignorable: tuple[str, ...] = ()) -> None:
        """Refuse a checkpoint whose weights the built graph did not all use (a config.json that
        lies about the layer count, say), except names matching the architecture's `ignorable` globs."""
        left = [n for n in self.names() if n not in self.claimed and not any(fnmatch.fnmatchcase(n, g) for g in ignorable)]
        if left:
            more = f" and {len(left) - 3} more" if len(left) > 3 else ""
            raise KilnError(f"{len(left)} weights of {self.root} are not used by the graph config.json describes: "
                            f"{', '.join(sorted(left)[:3])}{more}", "check that config.json belongs to these weights")

    def tokenizer_files(self) -> list[Path]:
        return [self.root / n for n in TOKENIZER_FILES if (self.root / n).is_file()]

    def digest(self) -> str:
        """sha256 over config, weights, tokenizer and adapter files (streamed, 8 MiB at a time)."""
        def named_contents():  # each file's name, a NUL, then its bytes
            for p in self.hashed_files():
                yield p.name.encode() + b"\0"
                yield from file_chunks(p)

        return "sha256:" + sha256_chunks(named_contents())


@dataclass
class PrunedCheckpoint(Checkpoint):
    """Weights renamed (whole layers removed, the rest renumbered) and read with whole rows or
    columns removed; shapes as read (info) follow. Names are the view's; claimed holds view names."""

    slices: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)  # name -> (axis, indices kept)
    sources: dict[str, str] = field(default_factory=dict)  # view name -> checkpoint name

    def names(self) -> list[str]:
        return list(self.sources)

    def has(self, name: str) -> bool:
        return name in self.sources

    def info(self, name: str) -> TensorInfo:
        info = super().info(self.sources[name])
        if name not in self.slices:
            return info
        axis, keep = self.slices[name]
        shape = list(info.shape)
        shape[axis] = len(keep)
        return dataclasses.replace(info, shape=tuple(shape))

    def read(self, name: str) -> np.ndarray:
        w = super().read(self.sources[name])
        if name not in self.slices:
            return w
        axis, keep = self.slices[name]
        return np.ascontiguousarray(np.take(w, keep, axis=axis))


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _load_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise KilnError(f"{index} has no weight_map", "re-download the checkpoint's index file")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise KilnError(f"{root} lacks shard {missing[0]} named in {index.name}", "download every shard of the checkpoint")
        return [root / s for s in shards]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(root.glob("*.safetensors"))
    if found:
        return found
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise KilnError(
            f"{root} holds only pickle weights (*.bin/*.pt), which kiln never loads",
            "convert the checkpoint to safetensors",
        )
    raise KilnError(f"{root} has no *.safetensors weights", "download the model's safetensors files")
