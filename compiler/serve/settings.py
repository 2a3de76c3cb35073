"""kiln serve's runtime settings, each from the first place that gives it:
its command-line flag; the tuned record of `--tuned WORKLOAD` (kiln.json `tuned.<workload>`,
written by `kiln tune`); the engine's `serve:` defaults (its recipe's, in engine.json); kiln's own.
"""

from __future__ import annotations

import json
from pathlib import Path

BUILTIN = {"max_num_seqs": None, "max_num_batched_tokens": 512, "prefix_cache_tokens": 4096, "threads": None}


def tuned_record(artifact: Path, workload: str) -> dict:
    """The artifact's record of `kiln tune ... --workload workload`; ValueError naming what exists."""
    try:
        manifest = json.loads((Path(artifact) / "kiln.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{artifact}: kiln.json cannot be read ({e}); --tuned needs a built artifact") from None
    tuned = manifest.get("tuned") or {}
    if workload not in tuned:
        have = ", ".join(sorted(tuned)) or "none"
        raise ValueError(f"{artifact} was not tuned for workload {workload!r} (tuned for: {have}); "
                         f"run `kiln tune RECIPE --workload {workload}` and serve the artifact it names")
    return tuned[workload]


def engine_defaults(artifact: Path) -> dict:
    """engine.json's `serve` section (the recipe's `serve:`), or {}."""
    try:
        return json.loads((Path(artifact) / "engine.json").read_text()).get("serve") or {}
    except (OSError, ValueError):
        return {}


def resolve(flags: dict, artifact: Path, workload: str | None) -> tuple[dict, dict]:
    """(runtime settings: BUILTIN's keys, speculation: speculate / num_speculative) for serving.
    flags: the command line's values, None where not given."""
    tuned = tuned_record(artifact, workload) if workload else {}
    layers = [flags, tuned.get("serve", {}), engine_defaults(artifact)]
    runtime = {k: next((layer[k] for layer in layers if layer.get(k) is not None), default) for k, default in BUILTIN.items()}
    spec = {"speculate": flags.get("speculate"), "num_speculative": flags.get("num_speculative")}
    if spec["speculate"] is None and tuned:
        spec = {"speculate": tuned.get("speculate") or "off", "num_speculative": tuned.get("num_speculative")}
    return runtime, spec
