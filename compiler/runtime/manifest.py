"""An artifact's two records, read and written through this module only.

- `engine.json`: the `EngineConfig` (runtime/config.py), the runtime's contract with the backend.
- `kiln.json`: the `Manifest`, what went in (recipe, source digest), what came out (I/O, passes,
  quality, cost, the CPU it was built on), `kiln tune`'s records and every file's sha256 and size.

    m = read_manifest(artifact)              # ArtifactTampered naming the problem
    m.tuned, m.build_key                     # typed where kiln reads it; m.data holds it all
    write_manifest(artifact, m.with_tuned("chat", entry))   # atomic: a temp file renamed
    cfg = read_engine(artifact)              # InvalidEngineConfig naming the problem
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compiler.runtime.config import EngineConfig

MANIFEST, ENGINE = "kiln.json", "engine.json"
MAX_MANIFEST_BYTES = 16 << 20  # a kiln.json read from an archive or a registry, in memory

# top-level fields kiln reads, and the JSON type each must have when present
_FIELDS = {"kiln_version": str, "name": str, "recipe": dict, "source": dict, "backend": dict, "io": dict, "graph": dict,
           "quantization": dict, "quality": dict, "build": dict, "task": str, "build_key": str, "plugins": list,
           "files": dict, "sizes": dict, "tuned": dict, "kv_cache": dict}


class ArtifactTampered(ValueError):
    pass


@dataclass(frozen=True)
class Manifest:
    data: dict  # kiln.json as written: every field, for the engine card and the registry annotations

    @classmethod
    def from_dict(cls, d: object, where: object = "kiln.json") -> "Manifest":
        if not isinstance(d, dict):
            raise ArtifactTampered(f"{where}: kiln.json is not a JSON object; re-pull or rebuild the artifact")
        for key, kind in _FIELDS.items():
            if d.get(key) is not None and not isinstance(d[key], kind):
                raise ArtifactTampered(f"{where}: kiln.json's {key} is not a JSON {kind.__name__}; "
                                       "re-pull or rebuild the artifact")
        return cls(d)

    @classmethod
    def from_json(cls, raw: str | bytes, where: object = "kiln.json") -> "Manifest":
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ArtifactTampered(f"{where}: kiln.json is not valid JSON ({e}); re-pull or rebuild the artifact") from None
        return cls.from_dict(d, where)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, default=str) + "\n"

    @property
    def build_key(self) -> str | None:
        return self.data.get("build_key")

    @property
    def tuned(self) -> dict:
        """workload name -> the record `kiln tune` wrote for it."""
        return self.data.get("tuned") or {}

    def with_tuned(self, workload: str, entry: dict | None) -> "Manifest":
        """This manifest with tuned.<workload> set, or with None dropped."""
        tuned = {k: v for k, v in self.tuned.items() if k != workload}
        if entry is not None:
            tuned[workload] = entry
        return Manifest({**self.data, "tuned": tuned})


def read_manifest(artifact: Path) -> Manifest:
    path = Path(artifact) / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise ArtifactTampered(f"{artifact} has no kiln.json: not a kiln artifact, or an incomplete copy")
    return Manifest.from_json(path.read_bytes(), artifact)


def write_manifest(artifact: Path, manifest: Manifest) -> None:
    _write(Path(artifact) / MANIFEST, manifest.to_json())


def read_engine(artifact: Path) -> EngineConfig:
    return EngineConfig.load(Path(artifact) / ENGINE)


def write_engine(artifact: Path, cfg: EngineConfig) -> None:
    _write(Path(artifact) / ENGINE, cfg.to_json())


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
