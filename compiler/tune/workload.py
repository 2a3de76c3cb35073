"""Workload files: `workloads/*.yaml`, the traffic `kiln tune` picks settings for (schema 1).

A workload declares how long prompts and replies are (a length distribution each), how requests
arrive (a closed loop of N in flight, or open-loop Poisson arrivals at a rate), how much of every
prompt is a prefix common to the whole trace (a system prompt), and what is asked of the engine:
a p99 time-to-first-token or inter-token-latency bound, or, with neither, the most throughput.
A bad file fails with the file, the field and the fix, e.g.
`workloads/x.yaml: field 'input_tokens.min': min 20 is greater than max 10; fix 'input_tokens' ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import Field, ValidationError, model_validator

from compiler.config_base import StrictModel, load_mapping
from compiler.errors import KilnError

SCHEMA_VERSION = 1
WORKLOADS_DIR = Path(__file__).resolve().parents[2] / "workloads"
EXAMPLE = "workloads/chat.yaml"

TokenCount = Annotated[int, Field(ge=1)]
Weight = Annotated[float, Field(gt=0)]


class Fixed(StrictModel):
    """Every request has the same length."""

    kind: Literal["fixed"]
    value: TokenCount

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)

    def mean(self) -> float:
        return float(self.value)


class Uniform(StrictModel):
    """A length drawn uniformly from min..max, both included."""

    kind: Literal["uniform"]
    min: TokenCount
    max: TokenCount

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.min, self.max + 1, size=n, dtype=np.int64)

    def mean(self) -> float:
        return (self.min + self.max) / 2


class Histogram(StrictModel):
    """Bins [lo, hi, weight]: a bin is picked with probability weight / total, then a length is
    drawn uniformly from lo..hi, both included."""

    kind: Literal["histogram"]
    bins: list[tuple[TokenCount, TokenCount, Weight]] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self):
        for i, (lo, hi, _) in enumerate(self.bins):
            if lo > hi:
                raise ValueError(f"bin {i}: lo {lo} is greater than hi {hi}")
        return self

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi, w = (np.array(col) for col in zip(*self.bins))
        return lo.astype(np.int64), hi.astype(np.int64), w.astype(np.float64) / w.sum()

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        lo, hi, p = self._arrays()
        pick = rng.choice(len(p), size=n, p=p)
        return rng.integers(lo[pick], hi[pick] + 1, dtype=np.int64)

    def mean(self) -> float:
        lo, hi, p = self._arrays()
        return float(np.sum(p * (lo + hi) / 2))


Distribution = Annotated[Union[Fixed, Uniform, Histogram], Field(discriminator="kind")]
DISTRIBUTION_KINDS = ("fixed", "uniform", "histogram")


class Arrival(StrictModel):
    """Exactly one of: concurrency (closed loop: that many requests in flight, a new one starts
    when one finishes) or rate_per_s (open loop: Poisson arrivals at that mean rate)."""

    concurrency: int | None = Field(None, ge=1, le=4096)
    rate_per_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("concurrency", "rate_per_s") if getattr(self, k) is not None]
        if len(given) != 1:
            which = "both are given" if given else "neither is given"
            raise ValueError(f"give exactly one of concurrency (closed loop) or rate_per_s (open loop); {which}")
        return self

    @property
    def closed_loop(self) -> bool:
        return self.concurrency is not None


class Targets(StrictModel):
    """p99 latency bounds, in milliseconds; none set means "the most throughput"."""

    ttft_p99_ms: float | None = Field(None, gt=0, description="time to first token, p99")
    itl_p99_ms: float | None = Field(None, gt=0, description="inter-token latency, p99")

    def latency_keys(self) -> tuple[str, ...]:
        """The bounds that are set, in the order ttft_p99_ms, itl_p99_ms."""
        return tuple(k for k in ("ttft_p99_ms", "itl_p99_ms") if getattr(self, k) is not None)

    @property
    def kind(self) -> Literal["ttft_p99_ms", "itl_p99_ms", "max_throughput"]:
        """What the workload is judged on first: the one bound that is set, itl_p99_ms when both
        are (latency_keys() lists every bound to hold), max_throughput when none is."""
        keys = self.latency_keys()
        if not keys:
            return "max_throughput"
        return "itl_p99_ms" if "itl_p99_ms" in keys else "ttft_p99_ms"


class Workload(StrictModel):
    schema_version: Literal[1] = Field(alias="schema")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str = ""
    requests: int = Field(48, ge=1, le=10000, description="trace length")
    input_tokens: Distribution
    output_tokens: Distribution
    arrival: Arrival
    shared_prefix: float = Field(0.0, ge=0, le=1, description="fraction of each prompt common to every request")
    targets: Targets = Targets()
    seed: int = Field(0, ge=0)


def known_workloads() -> list[str]:
    """The names of the workloads shipped in workloads/ (what `--workload NAME` accepts)."""
    return sorted(p.stem for p in WORKLOADS_DIR.glob("*.yaml"))


def workload_path(spec: str | Path) -> Path:
    """The file a workload spec names: a path (it has a directory part or a .yaml/.yml suffix), or
    a bare name such as `chat` (workloads/chat.yaml); refused with the fix if there is none."""
    if isinstance(spec, Path) or "/" in spec or "\\" in spec or spec.endswith((".yaml", ".yml")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise KilnError(f"workload {path} does not exist",
                            f"pass a workload YAML file or a known name ({', '.join(known_workloads())})")
        return path
    path = WORKLOADS_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise KilnError(f"no workload named {spec!r} (known: {', '.join(known_workloads()) or 'none'})",
                        "pass one of those names or a path to a workload YAML file")
    return path


def load_workload(spec: str | Path) -> Workload:
    """A workload from a YAML file's path, or from a bare name such as `chat` (workloads/chat.yaml)."""
    path = workload_path(spec)
    return parse_workload(load_mapping(path, "workload", EXAMPLE), str(path))


def _field(loc: tuple) -> str:
    """The error's field path, without the distribution kind pydantic puts after a tagged union
    (input_tokens.uniform.min -> input_tokens.min)."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("input_tokens", "output_tokens") and parts[1] in DISTRIBUTION_KINDS:
        del parts[1]
    return ".".join(parts) or "(top level)"


def parse_workload(data: dict, where: str = "workload") -> Workload:
    try:
        return Workload.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = _field(err["loc"])
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        elif err["type"] == "missing":
            reason = "required field is missing"
        raise KilnError(f"{where}: field '{field}': {reason}",
                        f"fix '{field}' (schema version {SCHEMA_VERSION}; see {EXAMPLE} for the fields)") from None


__all__ = ["Arrival", "Distribution", "Fixed", "Histogram", "Targets", "Uniform", "Workload",
           "known_workloads", "load_workload", "parse_workload", "workload_path"]
