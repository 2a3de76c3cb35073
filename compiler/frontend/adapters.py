"""PEFT LoRA adapters, merged into a checkpoint's weights as they are read.

An adapter is a PEFT directory: `adapter_config.json` and `adapter_model.safetensors` (never the
pickle `adapter_model.bin`). Each target module `m` holds `m.lora_A.weight` [r, in] and
`m.lora_B.weight` [out, r]; the merged weight is W + s * B @ A with s = lora_alpha / r
(lora_alpha / sqrt(r) with `use_rslora`), r and alpha per module where `rank_pattern` /
`alpha_pattern` say so, as peft's own merge computes it. Several adapters add up, in order.

    adapter = Adapter.open("math", Path("adapters/math"), ckpt)   # every refusal, named
    ckpt = ckpt.with_adapters([adapter])                            # read() now returns merged weights

Refused by name: a non-LoRA adapter, DoRA, fan-in-fan-out layouts, trained biases,
`modules_to_save`, embedding LoRA, a module the checkpoint lacks, a shape that is not the
base weight's, a target module with no weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compiler.errors import KilnError
from compiler.frontend.safetensors_file import SafetensorsFile

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
UNSUPPORTED = {"use_dora": "DoRA adapters", "fan_in_fan_out": "fan-in-fan-out (Conv1D) layouts",
               "modules_to_save": "modules_to_save (full copies of modules)"}


@dataclass(frozen=True)
class Delta:
    a: str  # names in the adapter file: lora_A [r, in], lora_B [out, r]
    b: str
    scale: float


@dataclass
class Adapter:
    name: str
    root: Path
    config: dict
    file: SafetensorsFile
    deltas: dict[str, Delta] = field(default_factory=dict)  # base weight name -> its low-rank update

    @classmethod
    def open(cls, name: str, root: Path, base) -> "Adapter":
        """Read and check an adapter against `base` (a Checkpoint)."""
        where = f"adapter {name} ({root})"
        if not (root / CONFIG).is_file():
            raise KilnError(f"{where} has no {CONFIG}", "point adapters[].path at a PEFT adapter directory")
        if not (root / WEIGHTS).is_file():
            pickle = (root / "adapter_model.bin").is_file()
            raise KilnError(f"{where} has no {WEIGHTS}" + (" (only the pickle adapter_model.bin, which kiln never loads)"
                                                           if pickle else ""),
                            "save the adapter with safetensors (peft's save_pretrained does by default)")
        try:
            config = json.loads((root / CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise KilnError(f"{where}: {CONFIG} is not valid JSON ({e.msg})", "fix or re-save the adapter") from None
        adapter = cls(name, root, config, SafetensorsFile(root / WEIGHTS))
        adapter._check_config(where)
        adapter.deltas = adapter._read_deltas(where, base)
        return adapter

    def _check_config(self, where: str) -> None:
        c = self.config
        if c.get("peft_type") != "LORA":
            raise KilnError(f"{where} is a {c.get('peft_type')!r} adapter; kiln merges LoRA adapters",
                            "use a LoRA adapter (peft_type LORA)")
        for key, what in UNSUPPORTED.items():
            if c.get(key):
                raise KilnError(f"{where} uses {key}: kiln does not merge {what}", f"train the adapter without {key}")
        if c.get("bias", "none") != "none":
            raise KilnError(f"{where} trains biases (bias: {c['bias']!r}); kiln merges weight updates only",
                            "train the adapter with bias: none")
        if not isinstance(c.get("r"), int) or c["r"] < 1:
            raise KilnError(f"{where}: r must be a positive rank, got {c.get('r')!r}", "fix adapter_config.json")

    def _scale(self, module: str) -> float:
        c = self.config
        r = _pattern(c.get("rank_pattern") or {}, module, c["r"])
        alpha = _pattern(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r

    def _read_deltas(self, where: str, base) -> dict[str, Delta]:
        modules: dict[str, dict[str, str]] = {}
        for key in self.file.tensors:
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if m is None:
                raise KilnError(f"{where}: tensor {key} is not a LoRA A/B weight (embedding LoRA, DoRA magnitudes "
                                "and other extras are not merged)", "use a plain LoRA adapter on linear layers")
            modules.setdefault(m.group(1), {})[m.group(2)] = key
        deltas = {}
        for module, pair in sorted(modules.items()):
            deltas[module + ".weight"] = self._delta(where, base, module, pair)
        self._check_targets(where, modules)
        return deltas

    def _delta(self, where: str, base, module: str, pair: dict[str, str]) -> Delta:
        if set(pair) != {"A", "B"}:
            raise KilnError(f"{where}: module {module} has lora_{'A' if 'A' in pair else 'B'} without its pair",
                            "re-save the adapter")
        weight = module + ".weight"
        if weight not in base.index:
            raise KilnError(f"{where} targets {module}, which the checkpoint does not have",
                            "use an adapter trained on this base model")
        a, b = self.file.tensors[pair["A"]].shape, self.file.tensors[pair["B"]].shape
        w = base.info(weight).shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or [b[0], a[1]] != list(w):
            raise KilnError(f"{where}: module {module} has lora_A {list(a)} and lora_B {list(b)}, which do not update "
                            f"its weight {list(w)}", "use an adapter trained on this base model")
        return Delta(pair["A"], pair["B"], self._scale(module))

    def _check_targets(self, where: str, modules: dict) -> None:
        targets = self.config.get("target_modules")
        if isinstance(targets, str) or not targets:
            return  # a regex or "all-linear": whatever the file holds
        found = {m.rsplit(".", 1)[-1] for m in modules}
        missing = sorted(set(targets) - found)
        if missing:
            raise KilnError(f"{where} lists target module {missing[0]} but holds no weights for it",
                            "re-save the adapter, or fix target_modules in adapter_config.json")

    def update(self, weight: str) -> np.ndarray | None:
        """s * B @ A [out, in] float32 for a base weight this adapter changes, else None."""
        d = self.deltas.get(weight)
        if d is None:
            return None
        a = np.asarray(self.file.read(d.a), dtype=np.float32)  # [r, in]
        b = np.asarray(self.file.read(d.b), dtype=np.float32)  # [out, r]
        return (b @ a) * np.float32(d.scale)

    def record(self) -> dict:
        """What kiln.json says of the adapter."""
        ranks = sorted({self.file.tensors[d.a].shape[0] for d in self.deltas.values()})
        return {"name": self.name, "path": str(self.root), "rank": ranks, "lora_alpha": self.config.get("lora_alpha"),
                "rslora": bool(self.config.get("use_rslora")), "modules": len(self.deltas),
                "targets": sorted({w.rsplit(".", 2)[-2] for w in self.deltas})}


def _pattern(patterns: dict, module: str, default):
    """peft's per-module override: the first key that matches the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def merged(weight: str, base: np.ndarray, adapters: list[Adapter]) -> np.ndarray:
    """base [out, in] with every adapter's update to it added (float32), or base unchanged."""
    updates = [u for u in (a.update(weight) for a in adapters) if u is not None]
    if not updates:
        return base
    out = np.asarray(base, dtype=np.float32).copy()
    for u in updates:
        out += u
    return out
