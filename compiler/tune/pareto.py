"""Which measured settings to pick for a workload: dominance, the Pareto front, the choice, and
the Search that measures candidates under a time budget.

A Point is one candidate (build + runtime settings) with the Measurements of its replays; its
figures are medians over them. Targets are the workload's p99 latency bounds (ttft_p99_ms,
itl_p99_ms, either may be None; none set means "the most throughput"). `choose` picks the highest
throughput among the points meeting every bound; `pareto_front` keeps the points no other beats.

Search measures the candidates one after another. A machine drifts during a search (heat, clocks,
other load), so figures taken minutes apart are not comparable: every replay of a candidate is
followed by a replay of the current best, and a candidate is judged by the ratio of its replay
to the best's replays beside it in time. The points it returns carry drift-corrected replays:
each scaled to the level of the default's replays through that chain of side-by-side ratios (raw
figures are kept in SearchResult.replays). Nothing here touches an engine: `measure` is a callable.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence, overload

TARGET_METRICS = ("ttft_p99_ms", "itl_p99_ms")  # what a workload can bound, in this order
LATENCY_METRICS = ("ttft_p99_ms", "itl_p99_ms", "ttft_p50_ms", "itl_p50_ms")
_SCALED = ("throughput_tok_s",) + LATENCY_METRICS  # what drift correction rescales (not seconds)
_LABELS = {"ttft_p99_ms": "ttft p99", "itl_p99_ms": "itl p99", "ttft_p50_ms": "ttft p50", "itl_p50_ms": "itl p50"}


@dataclass(frozen=True)
class Measurement:
    """One replay of the workload's trace against one candidate."""

    throughput_tok_s: float  # output tokens per second over the replay
    ttft_p99_ms: float
    itl_p99_ms: float
    ttft_p50_ms: float
    itl_p50_ms: float
    seconds: float  # wall time of the replay: what the search budget is spent on


class Targets(Protocol):
    """Latency bounds in ms; None: no bound on that metric (compiler.tune.workload.Targets fits)."""

    @property
    def ttft_p99_ms(self) -> float | None: ...

    @property
    def itl_p99_ms(self) -> float | None: ...


def target_limits(targets: Targets | None) -> dict[str, float]:
    """The bounds that are set, metric -> limit, in the order of TARGET_METRICS."""
    if targets is None:
        return {}
    limits = {m: getattr(targets, m) for m in TARGET_METRICS}
    return {m: float(v) for m, v in limits.items() if v is not None}


def primary_metric(targets: Targets | None) -> str | None:
    """The bound a workload is judged on first: itl p99 when both are set (as workload.Targets.kind
    says), else the one set, else None (max throughput)."""
    limits = target_limits(targets)
    return "itl_p99_ms" if "itl_p99_ms" in limits else next(iter(limits), None)


def describe(targets: Targets | None) -> str:
    limits = target_limits(targets)
    return " and ".join(f"{_LABELS[m]} <= {v:g} ms" for m, v in limits.items()) or "no latency target"


@dataclass
class Point:
    """A candidate's settings and replays; figures are medians over the replays."""

    key: str  # a stable id of the settings
    settings: dict[str, Any]  # build + runtime settings, JSON-able
    runs: list[Measurement] = field(default_factory=list)
    quality: float | None = None  # perplexity increase % over fp32; None for fp32 itself
    stopped_early: bool = False  # Search stopped measuring it before `rounds` replays

    def _median(self, name: str) -> float:
        if not self.runs:
            raise ValueError(f"point {self.key!r} has no measurements")
        return statistics.median(getattr(r, name) for r in self.runs)

    @property
    def throughput(self) -> float:
        return self._median("throughput_tok_s")

    @overload
    def latency(self, keys: str) -> float: ...

    @overload
    def latency(self, keys: Sequence[str]) -> dict[str, float]: ...

    def latency(self, keys: str | Sequence[str]) -> float | dict[str, float]:
        """The median of one latency metric, or a dict of them for several."""
        names = [keys] if isinstance(keys, str) else list(keys)
        for name in names:
            if name not in LATENCY_METRICS:
                raise ValueError(f"unknown latency metric {name!r} (known: {', '.join(LATENCY_METRICS)})")
        if isinstance(keys, str):
            return self._median(keys)
        return {name: self._median(name) for name in names}

    def meets(self, targets: Targets | None) -> bool:
        return all(self.latency(m) <= limit for m, limit in target_limits(targets).items())


def _ppl(p: Point) -> float:
    return 0.0 if p.quality is None else p.quality  # fp32 itself: no increase


def dominates(a: Point, b: Point, targets: Targets | None) -> bool:
    """a is at least as good as b on every objective and strictly better on one. The objectives:
    throughput (higher), quality (lower ppl increase) and the latency metrics the targets bound
    (lower); with no bound, latency is not an objective (max throughput)."""
    # each pair (a's, b's) is oriented so that higher is better
    pairs = [(a.throughput, b.throughput), (-_ppl(a), -_ppl(b))]
    pairs += [(-a.latency(m), -b.latency(m)) for m in target_limits(targets)]
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def _rank(p: Point, index: int, tie_metrics: Sequence[str]) -> tuple:
    """Sort key: throughput first, ties to the lower latency, the better quality, then the earlier
    point in the list (callers list the default and cheaper settings first)."""
    return (-p.throughput, *(p.latency(m) for m in tie_metrics), _ppl(p), index)


def _tie_metrics(targets: Targets | None) -> list[str]:
    return list(target_limits(targets)) or list(TARGET_METRICS)


def pareto_front(points: Sequence[Point], targets: Targets | None) -> list[Point]:
    """The points no other point dominates, highest throughput first."""
    ties = _tie_metrics(targets)
    front = [(i, p) for i, p in enumerate(points)
             if not any(dominates(q, p, targets) for q in points if q is not p)]
    return [p for _, p in sorted(front, key=lambda ip: _rank(ip[1], ip[0], ties))]


def choose(points: Sequence[Point], targets: Targets | None) -> tuple[Point, str]:
    """The highest throughput among the points meeting every bound, and a one-line reason. When
    none meets them: the lowest median on the primary bound (ties: higher throughput)."""
    if not points:
        raise ValueError("no measured points to choose from")
    meeting = [(i, p) for i, p in enumerate(points) if p.meets(targets)]
    limits = target_limits(targets)
    if meeting:
        ties = _tie_metrics(targets)
        best = min(meeting, key=lambda ip: _rank(ip[1], ip[0], ties))[1]
        if not limits:
            return best, (f"{best.key}: the highest throughput ({best.throughput:.0f} tok/s) of "
                          f"{len(points)} points (no latency target)")
        figures = ", ".join(f"{_LABELS[m]} {best.latency(m):.1f} ms" for m in limits)
        return best, (f"{best.key}: the highest throughput ({best.throughput:.0f} tok/s) of the "
                      f"{len(meeting)}/{len(points)} points meeting {describe(targets)} ({figures})")
    first = primary_metric(targets)
    assert first is not None  # with no bound every point meets them
    best = min(enumerate(points), key=lambda ip: (ip[1].latency(first), -ip[1].throughput, ip[0]))[1]
    return best, (f"no point met {describe(targets)}; {best.key} has the lowest {_LABELS[first]} "
                  f"({best.latency(first):.1f} ms, {best.throughput:.0f} tok/s)")


@dataclass(frozen=True)
class Replay:
    """One replay as measured (raw figures), in the order the search ran them."""

    key: str
    measurement: Measurement
    # a candidate's replay: the best it is compared with. None: a replay of the default on its
    # own, or of the best beside a candidate's replay (the reference side of a comparison)
    against: str | None


@dataclass
class SearchResult:
    """What Search.run measured and chose; figures of points are on the default's scale."""

    points: list[Point]  # every candidate measured at least once, drift-corrected, in list order
    front: list[Point]
    chosen: Point
    reason: str
    default: Point  # the first candidate's point
    gain: float  # chosen throughput / default throughput, through side-by-side ratios
    log: list[str]
    replays: list[Replay]  # the raw replays, in time order


class Search:
    """Measure candidates, interleaved with the current best, within budget_s of `clock`.

    Each candidate gets up to `rounds` replays, each followed by a replay of the current best.
    After `min_rounds`, a candidate is dropped (stopped_early) when its throughput is below the
    best's by more than `noise` and it misses a bound the best meets, or below by more than
    2 * noise with no latency gain over the best (on the bounded metrics) larger than noise.
    A replay is started only if its expected time (the median of that candidate's replays so
    far, else of all replays) fits in what is left of the budget; the default (the first
    candidate) is always replayed once. `quality(settings)` gives a point's ppl increase.
    """

    def __init__(self, candidates: list[tuple[str, dict]], measure: Callable[[dict], Measurement],
                 targets: Targets | None, budget_s: float, clock: Callable[[], float] = time.monotonic,
                 rounds: int = 3, min_rounds: int = 1, noise: float = 0.05,
                 on_progress: Callable[[str], None] | None = None,
                 quality: Callable[[dict], float | None] | None = None):
        if not candidates:
            raise ValueError("no candidates to search")
        keys = [k for k, _ in candidates]
        if len(set(keys)) != len(keys):
            raise ValueError(f"candidate keys repeat: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
        if rounds < 1 or not 1 <= min_rounds <= rounds:
            raise ValueError(f"need 1 <= min_rounds <= rounds (got min_rounds={min_rounds}, rounds={rounds})")
        if noise < 0 or budget_s < 0:
            raise ValueError(f"noise and budget_s must not be negative (got {noise}, {budget_s})")
        self.keys = keys
        self.settings = {k: dict(s) for k, s in candidates}
        self.measure, self.targets, self.budget_s, self.clock = measure, targets, budget_s, clock
        self.rounds, self.min_rounds, self.noise = rounds, min_rounds, noise
        self.on_progress = on_progress
        self.quality = quality or (lambda settings: None)
        self._replays: list[Replay] = []
        self._log: list[str] = []
        self._stopped: set[str] = set()
        self._start = 0.0

    def _say(self, line: str) -> None:
        self._log.append(line)
        if self.on_progress is not None:
            self.on_progress(line)

    def _expected_s(self, key: str) -> float:
        own = [r.measurement.seconds for r in self._replays if r.key == key]
        seen = own or [r.measurement.seconds for r in self._replays]
        return statistics.median(seen) if seen else 0.0

    def _replay(self, key: str, against: str | None, force: bool = False) -> bool:
        """Replay `key` once if the budget allows (or `force`); False when it was not started."""
        used = self.clock() - self._start
        expected = self._expected_s(key)
        if not force and used + expected > self.budget_s:
            self._say(f"{key}: replay not started: {expected:.1f} s expected, "
                      f"{used:.1f} of the {self.budget_s:.1f} s budget used")
            return False
        m = self.measure(self.settings[key])
        self._replays.append(Replay(key, m, against))
        n = sum(r.key == key for r in self._replays)
        beside = f" beside {against}" if against else ""
        self._say(f"{key} #{n}{beside}: {m.throughput_tok_s:.0f} tok/s, "
                  f"ttft p99 {m.ttft_p99_ms:.1f} ms, itl p99 {m.itl_p99_ms:.1f} ms, {m.seconds:.1f} s")
        return True

    def _corrected(self, i: int, levels: dict[str, Measurement]) -> Measurement:
        """Replay i at the default's level: its ratio to the replays of its reference beside it in
        time (the median of all of them when none is beside it), times the reference's level."""
        replay = self._replays[i]
        if replay.against is None:
            return replay.measurement  # the default's replays are the scale everything is put on
        ref = replay.against
        beside = [self._replays[j].measurement for j in (i - 1, i + 1)
                  if 0 <= j < len(self._replays) and self._replays[j].key == ref]
        if not beside:
            beside = [r.measurement for r in self._replays if r.key == ref]
        scaled = {}
        for name in _SCALED:
            mine = getattr(replay.measurement, name)
            theirs = statistics.median(getattr(b, name) for b in beside)
            scaled[name] = mine * getattr(levels[ref], name) / theirs if theirs > 0 else mine
        return replace(replay.measurement, **scaled)

    def points(self) -> dict[str, Point]:
        """The points measured so far, drift-corrected. A point's runs are its candidate replays;
        the default's are all of its replays (its level is the scale)."""
        own: dict[str, list[int]] = {}
        for i, r in enumerate(self._replays):
            if r.against is not None or r.key == self.keys[0]:
                own.setdefault(r.key, []).append(i)
        levels: dict[str, Measurement] = {}
        points: dict[str, Point] = {}
        # first-appearance order: a candidate's reference was measured (and levelled) before it
        for key, indices in own.items():
            runs = [self._corrected(i, levels) for i in indices]
            levels[key] = Measurement(**{name: statistics.median(getattr(r, name) for r in runs)
                                         for name in _SCALED + ("seconds",)})
            points[key] = Point(key, self.settings[key], runs, self.quality(self.settings[key]), key in self._stopped)
        return {k: points[k] for k in self.keys if k in points}

    def _beaten(self, key: str, best: str) -> str | None:
        """Why `key` need not be measured further against `best`, or None."""
        pts = self.points()
        c, b = pts[key], pts[best]
        if b.throughput <= 0:
            return None
        ratio = c.throughput / b.throughput  # the median side-by-side ratio (both on one scale)
        limits = target_limits(self.targets)
        missed = [m for m, limit in limits.items() if b.latency(m) <= limit < c.latency(m)]
        if ratio < 1 - self.noise and missed:
            return f"{ratio:.2f}x the best's throughput and misses the {_LABELS[missed[0]]} bound {best} meets"
        ahead = [m for m in limits if c.latency(m) < b.latency(m) * (1 - self.noise)]
        if ratio < 1 - 2 * self.noise and not ahead:
            return f"{ratio:.2f}x the best's throughput and no latency gain"
        return None

    def _candidate(self, key: str, best: str) -> str:
        """Measure one candidate against the best; the best afterwards."""
        for n in range(1, self.rounds + 1):
            if not self._replay(key, best):
                break
            self._replay(best, None)  # the best beside it; skipped when the budget is short
            why = self._beaten(key, best) if self.min_rounds <= n < self.rounds else None
            if why:
                self._stopped.add(key)
                self._say(f"{key}: stopped after {n} replay(s): {why}")
                break
        pts = self.points()
        if key not in pts:
            return best
        new, _ = choose(list(pts.values()), self.targets)
        if new.key != best:
            ratio = new.throughput / pts[best].throughput if pts[best].throughput > 0 else math.inf
            self._say(f"best is now {new.key}: {ratio:.2f}x {best}'s throughput side by side")
        return new.key

    def run(self) -> SearchResult:
        self._replays, self._log, self._stopped = [], [], set()
        self._start = self.clock()
        default = self.keys[0]
        self._replay(default, None, force=True)
        if len(self.keys) == 1:  # nothing to interleave with: the default gets its rounds alone
            for _ in range(self.rounds - 1):
                if not self._replay(default, None):
                    break
        best = default
        for key in self.keys[1:]:
            best = self._candidate(key, best)
        pts = self.points()
        points = list(pts.values())
        chosen, reason = choose(points, self.targets)
        base = pts[default]
        gain = chosen.throughput / base.throughput if base.throughput > 0 else math.nan
        reason = f"{reason}; {gain:.2f}x the default's throughput side by side"
        skipped = [k for k in self.keys if k not in pts]
        if skipped:
            self._say(f"not measured (budget): {', '.join(skipped)}")
        self._say(f"chosen: {reason}")
        return SearchResult(points, pareto_front(points, self.targets), chosen, reason, base, gain,
                            list(self._log), list(self._replays))
