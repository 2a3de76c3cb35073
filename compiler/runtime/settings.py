"""How an engine is driven: one `RuntimeSettings`, whichever driver and wherever its values came from.

Every driver turns one of these into its engine core (`settings.core(engine)`):
- generate() / stream() and `kiln run`: `RuntimeSettings.for_batch(n, engine, ...)`, rows for
  the batch, the whole prompt in one step, no prefix pool;
- `kiln serve`: `RuntimeSettings.resolve(artifact, flags, workload)`, each value from the first
  place that gives it: its command-line flag; the `--tuned WORKLOAD` record (kiln.json
  `tuned.<workload>`, written by `kiln tune`); the engine's `serve:` defaults (its recipe's, in
  engine.json); kiln's own (the field defaults below);
- kiln tune's replay: a point of its search (`key()` names it, `as_dict()` records it);
- the Triton model: its config parameters.
Speculation left unset (None) is the engine's default, its recipe's `speculative:` section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from compiler.runtime.core import EngineCore
from compiler.runtime.manifest import read_engine, read_manifest
from compiler.runtime.scheduler import SchedulerConfig
from compiler.runtime.speculative import Draft, SpeculativeConfig, resolve

SERVE_FIELDS = ("max_num_seqs", "max_num_batched_tokens", "prefix_cache_tokens", "threads")  # a recipe's `serve:`
SPECULATE = (None, "off", "ngram", "draft")


@dataclass(frozen=True)
class RuntimeSettings:
    max_num_seqs: int | None = None  # sequences at once (KV rows); None: the core's default (64 host rows)
    max_num_batched_tokens: int = 512  # tokens one step feeds
    prefix_cache_tokens: int = 4096  # KV of shared prompt prefixes kept (0: off)
    prefix_block_size: int = 16  # tokens a prefix block holds
    threads: int | None = None  # intra-op threads; None: the engine's (physical cores)
    kv_cache_gib: float | None = None  # KV memory budget; None: 4 GiB of host rows, or every device row
    speculate: str | None = None  # None: the engine's default | "off" | "ngram" | "draft"
    draft: str | None = None  # the draft artifact of speculate "draft" (else the recipe's)
    num_speculative: int | None = None  # tokens proposed a step; None: adaptive

    def __post_init__(self):
        if self.speculate not in SPECULATE:
            raise ValueError(f"speculate must be one of off, ngram, draft, got {self.speculate!r}")
        if self.draft and self.speculate not in (None, "draft"):
            raise ValueError(f"--draft goes with --speculate draft, not --speculate {self.speculate}")
        if self.draft and self.speculate is None:
            object.__setattr__(self, "speculate", "draft")

    # -- from where the values come ----------------------------------------------------------------
    @classmethod
    def layered(cls, *layers: dict) -> "RuntimeSettings":
        """Each field from the first layer that sets it (not None), else its default."""
        names = [f.name for f in dataclasses.fields(cls)]
        for layer in layers:
            unknown = sorted(set(layer) - set(names))
            if unknown:
                raise ValueError(f"unknown runtime setting {', '.join(unknown)}; known: {', '.join(names)}")
        values = {}
        for name in names:
            value = next((layer[name] for layer in layers if layer.get(name) is not None), None)
            if value is not None:
                values[name] = value
        return cls(**values)

    @classmethod
    def resolve(cls, artifact: Path, flags: dict, workload: str | None = None) -> "RuntimeSettings":
        """kiln serve's: flags > the tuned record of `workload` > the engine's `serve:` > kiln's."""
        artifact = Path(artifact)
        tuned = tuned_record(artifact, workload) if workload else {}
        record = {**tuned.get("serve", {}), "speculate": tuned.get("speculate"), "num_speculative": tuned.get("num_speculative")}
        if flags.get("speculate") is not None or flags.get("draft"):  # speculation is chosen as a whole
            record = {k: v for k, v in record.items() if k not in ("speculate", "num_speculative")}
        engine = read_engine(artifact).serve or {}
        if not isinstance(engine, dict):
            raise ValueError(f"{artifact}: engine.json's serve section is not a mapping; rebuild the artifact")
        return cls.layered(flags, record, engine)

    @classmethod
    def for_batch(cls, n: int, engine, speculate=None, num_speculative: int | None = None) -> "RuntimeSettings":
        """generate()'s: a row per prompt (within max_batch), whole prompts in one step.
        speculate: None, "off", "ngram", "draft" or Draft(path)."""
        if isinstance(speculate, Draft):
            speculate, draft, num_speculative = "draft", str(speculate.path), speculate.num_speculative or num_speculative
        else:
            draft = None
        cfg = engine.config
        return cls(max_num_seqs=min(n, cfg.max_batch), max_num_batched_tokens=max(cfg.max_seq, n), prefix_cache_tokens=0,
                   speculate="off" if speculate is False else speculate, draft=draft, num_speculative=num_speculative)

    # -- into the core -----------------------------------------------------------------------------
    def speculative(self, engine) -> SpeculativeConfig | None:
        return resolve(Draft(self.draft) if self.draft else self.speculate, engine, self.num_speculative)

    def scheduler(self, engine) -> SchedulerConfig:
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, kv_cache_gib=self.kv_cache_gib,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               prefix_cache_tokens=self.prefix_cache_tokens, prefix_block_size=self.prefix_block_size,
                               speculative=self.speculative(engine))

    def core(self, engine):
        """An engine core driven by these settings (the engine loaded with `threads`)."""
        return EngineCore(engine, self.scheduler(engine))

    # -- recorded ----------------------------------------------------------------------------------
    def serve_section(self) -> dict:
        """What a recipe's `serve:` (and a tuned record's) holds of these: the set values."""
        values = dataclasses.asdict(self)
        return {k: values[k] for k in SERVE_FIELDS if values[k] is not None}

    def key(self) -> str:
        spec = {"off": "nospec", None: "specdefault"}.get(self.speculate) or f"{self.speculate}{self.num_speculative or 'a'}"
        return (f"seqs{self.max_num_seqs or 'd'}-tok{self.max_num_batched_tokens}-thr{self.threads or 'd'}"
                f"-pfx{self.prefix_cache_tokens}-{spec}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def tuned_record(artifact: Path, workload: str) -> dict:
    """The artifact's record of `kiln tune ... --workload workload`; ValueError naming what exists."""
    tuned = read_manifest(artifact).tuned
    if workload not in tuned:
        have = ", ".join(sorted(tuned)) or "none"
        raise ValueError(f"{artifact} was not tuned for workload {workload!r} (tuned for: {have}); "
                         f"run `kiln tune RECIPE --workload {workload}` and serve the artifact it names")
    entry = tuned[workload]
    if not isinstance(entry, dict) or not isinstance(entry.get("serve", {}), dict):
        raise ValueError(f"{artifact}: kiln.json's record of workload {workload!r} is malformed; tune again")
    return entry
