"""compiler/tune/pareto.py: dominance, the front, the choice, and the Search's early stopping,
budget and drift handling, against a fake machine (synthetic Measurements from a table of true
figures, optionally slowing down per call) and a fake clock that advances by each replay."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from compiler.tune.pareto import (Measurement, Point, Search, choose, dominates, pareto_front,
                                  primary_metric, target_limits)
from compiler.tune.workload import Targets as WorkloadTargets


@dataclass(frozen=True)
class Bounds:
    """A stand-in for a workload's targets: anything with the two attributes will do."""

    ttft_p99_ms: float | None = None
    itl_p99_ms: float | None = None


def m(tok_s: float, ttft: float = 100.0, itl: float = 20.0, seconds: float = 2.0) -> Measurement:
    return Measurement(tok_s, ttft, itl, ttft / 2, itl / 2, seconds)


def pt(key: str, tok_s: float, ttft: float = 100.0, itl: float = 20.0, quality: float | None = None) -> Point:
    return Point(key, {"name": key}, [m(tok_s, ttft, itl)], quality)


@dataclass
class FakeMachine:
    """True figures per candidate name; each call slows the machine by `drift` (throughput times
    (1 - drift) ** calls, latencies divided by it) and advances the fake clock by the replay."""

    truth: dict[str, tuple[float, float, float]]  # name -> (tok/s, ttft p99, itl p99)
    drift: float = 0.0
    seconds: float = 2.0
    now: float = 0.0
    calls: list[str] = field(default_factory=list)
    starts: list[tuple[float, float]] = field(default_factory=list)  # (start, duration) per call

    def clock(self) -> float:
        return self.now

    def measure(self, settings: dict) -> Measurement:
        tok_s, ttft, itl = self.truth[settings["name"]]
        speed = (1 - self.drift) ** len(self.calls)
        self.calls.append(settings["name"])
        self.starts.append((self.now, self.seconds))
        self.now += self.seconds
        return m(tok_s * speed, ttft / speed, itl / speed, self.seconds)


def search(machine: FakeMachine, names: list[str], targets=None, budget_s: float = 1000.0, **kw) -> Search:
    return Search([(n, {"name": n}) for n in names], machine.measure, targets, budget_s, clock=machine.clock, **kw)


# --- Point, targets -------------------------------------------------------------------------

def test_point_medians_latency_and_meets():
    p = Point("a", {}, [m(100, 50), m(300, 70), m(200, 90)])
    assert p.throughput == 200
    assert p.latency("ttft_p99_ms") == 70
    assert p.latency(["ttft_p99_ms", "itl_p99_ms"]) == {"ttft_p99_ms": 70, "itl_p99_ms": 20}
    assert p.meets(Bounds(ttft_p99_ms=70)) and not p.meets(Bounds(ttft_p99_ms=69))
    assert p.meets(None) and p.meets(Bounds())
    with pytest.raises(ValueError, match="unknown latency metric"):
        p.latency("tpot")
    with pytest.raises(ValueError, match="no measurements"):
        Point("empty", {}).throughput


def test_primary_metric_agrees_with_workload_targets_kind():
    for ttft in (None, 200.0):
        for itl in (None, 30.0):
            real = WorkloadTargets(ttft_p99_ms=ttft, itl_p99_ms=itl)
            expected = None if real.kind == "max_throughput" else real.kind
            assert primary_metric(real) == expected
            assert list(target_limits(real)) == list(real.latency_keys())


# --- dominance ------------------------------------------------------------------------------

def test_dominates_on_throughput_and_bounded_latency():
    ttft = Bounds(ttft_p99_ms=200)
    fast, slow = pt("fast", 1200), pt("slow", 1000)
    assert dominates(fast, slow, ttft) and not dominates(slow, fast, ttft)
    same = pt("same", 1200)
    assert not dominates(fast, same, ttft) and not dominates(same, fast, ttft)  # nothing strictly better
    # a trade-off on a bounded metric: neither dominates
    quick_first = pt("quick_first", 1000, ttft=50)
    assert not dominates(fast, quick_first, ttft) and not dominates(quick_first, fast, ttft)
    # equal throughput, lower bounded latency: dominates
    assert dominates(pt("low", 1000, ttft=50), pt("high", 1000, ttft=80), ttft)


def test_dominates_ignores_unbounded_latency():
    fast_bad_ttft, slow_good_ttft = pt("a", 1200, ttft=900), pt("b", 1000, ttft=50)
    assert dominates(fast_bad_ttft, slow_good_ttft, None)  # max throughput: latency is no objective
    assert dominates(fast_bad_ttft, slow_good_ttft, Bounds(itl_p99_ms=30))  # only itl is bounded
    assert not dominates(fast_bad_ttft, slow_good_ttft, Bounds(ttft_p99_ms=1000))


def test_dominates_on_quality_none_counts_as_zero():
    assert not dominates(pt("int4", 1500, quality=8.0), pt("fp32", 1000, quality=None), None)
    assert dominates(pt("fp16", 1000, quality=0.4), pt("int8", 1000, quality=1.5), None)
    assert dominates(pt("fp32", 1000, quality=None), pt("int8", 1000, quality=1.5), None)
    # None and 0.0 are the same quality: identical otherwise, neither dominates
    assert not dominates(pt("fp32", 1000, quality=None), pt("fp16", 1000, quality=0.0), None)
    assert not dominates(pt("fp16", 1000, quality=0.0), pt("fp32", 1000, quality=None), None)


# --- front ----------------------------------------------------------------------------------

def test_pareto_front_exact_membership_and_order():
    points = [
        pt("a", 1000, ttft=100),
        pt("b", 1400, ttft=300),              # fastest, slow first token
        pt("c", 1200, ttft=150),              # between a and b: a trade-off with both
        pt("d", 1100, ttft=160),              # beaten by c on both
        pt("e", 900, ttft=60),                # the quickest first token
        pt("f", 1450, ttft=300, quality=9.0),  # faster than b but worse quality: a trade-off
        pt("g", 1000, ttft=100, quality=2.0),  # a's figures, worse quality: beaten by a
    ]
    front = pareto_front(points, Bounds(ttft_p99_ms=200))
    assert [p.key for p in front] == ["f", "b", "c", "a", "e"]
    # with no latency bound only throughput and quality count
    assert [p.key for p in pareto_front(points, None)] == ["f", "b"]


# --- choose ---------------------------------------------------------------------------------

CHOICES = [
    pt("big_batch", 2000, ttft=400, itl=50),
    pt("mid", 1500, ttft=180, itl=35),
    pt("small", 1000, ttft=90, itl=20),
    pt("tiny", 600, ttft=60, itl=25),
]


def test_choose_with_a_ttft_target():
    best, reason = choose(CHOICES, Bounds(ttft_p99_ms=200))
    assert best.key == "mid"
    assert "3/4 points meeting ttft p99 <= 200 ms" in reason


def test_choose_with_an_itl_target():
    best, _ = choose(CHOICES, Bounds(itl_p99_ms=30))
    assert best.key == "small"


def test_choose_with_both_targets():
    assert choose(CHOICES, Bounds(ttft_p99_ms=200, itl_p99_ms=40))[0].key == "mid"
    assert choose(CHOICES, Bounds(ttft_p99_ms=200, itl_p99_ms=30))[0].key == "small"


def test_choose_max_throughput():
    best, reason = choose(CHOICES, None)
    assert best.key == "big_batch" and "no latency target" in reason
    assert choose(CHOICES, Bounds())[0].key == "big_batch"


def test_choose_when_none_meets_takes_the_lowest_primary_latency():
    best, reason = choose(CHOICES, Bounds(ttft_p99_ms=10))
    assert best.key == "tiny" and reason.startswith("no point met ttft p99 <= 10 ms")
    # both bounded: itl is judged first (as the workload's Targets.kind)
    best, reason = choose(CHOICES, Bounds(ttft_p99_ms=10, itl_p99_ms=5))
    assert best.key == "small" and "lowest itl p99" in reason


def test_choose_ties_go_to_lower_latency_then_list_order():
    a, b, c = pt("a", 1000, ttft=90), pt("b", 1000, ttft=80), pt("c", 1000, ttft=80)
    assert choose([a, b, c], Bounds(ttft_p99_ms=100))[0] is b
    assert choose([c, b, a], None)[0] is c
    with pytest.raises(ValueError):
        choose([], None)


# --- Search: early stopping -----------------------------------------------------------------

def test_search_stops_a_clearly_worse_candidate_early():
    machine = FakeMachine({"default": (1000, 100, 20), "slow": (600, 100, 20), "close": (970, 100, 20)})
    result = search(machine, ["default", "slow", "close"], rounds=3, min_rounds=1).run()
    assert machine.calls.count("slow") == 1 and machine.calls.count("close") == 3
    stopped = {p.key: p.stopped_early for p in result.points}
    assert stopped == {"default": False, "slow": True, "close": False}
    assert result.chosen.key == "default"


def test_search_early_stop_needs_a_missed_bound_within_two_noise():
    # 8% slower: past noise (5%) but not 2 * noise; only the one missing the bound is dropped
    machine = FakeMachine({"default": (1000, 100, 20), "misses": (920, 300, 20), "meets": (920, 150, 20)})
    result = search(machine, ["default", "misses", "meets"], Bounds(ttft_p99_ms=200), min_rounds=2).run()
    assert machine.calls.count("misses") == 2 and machine.calls.count("meets") == 3
    assert [p.key for p in result.points if p.stopped_early] == ["misses"]


def test_search_keeps_a_slower_candidate_with_a_latency_gain():
    machine = FakeMachine({"default": (1000, 150, 20), "quick": (700, 90, 20)})
    search(machine, ["default", "quick"], Bounds(ttft_p99_ms=200)).run()
    assert machine.calls.count("quick") == 3


# --- Search: budget -------------------------------------------------------------------------

def test_search_never_starts_a_replay_that_would_overrun():
    machine = FakeMachine({"default": (1000, 100, 20), "a": (1100, 100, 20), "b": (1200, 100, 20)}, seconds=2.0)
    result = search(machine, ["default", "a", "b"], budget_s=9.0).run()
    assert len(machine.calls) == 4  # 4 * 2 s fit in 9 s, a fifth would end at 10 s
    assert all(start + duration <= 9.0 for start, duration in machine.starts)
    assert machine.calls == ["default", "a", "default", "a"]
    assert [p.key for p in result.points] == ["default", "a"]
    assert any("not measured (budget): b" in line for line in result.log)


def test_search_measures_the_default_even_with_a_tiny_budget():
    machine = FakeMachine({"default": (1000, 100, 20), "a": (1100, 100, 20)}, seconds=5.0)
    lines: list[str] = []
    result = search(machine, ["default", "a"], budget_s=0.5, on_progress=lines.append).run()
    assert machine.calls == ["default"]
    assert result.chosen is result.default and result.default.key == "default"
    assert result.gain == 1.0 and lines == result.log


def test_search_uses_each_candidates_own_replay_time():
    # at 8 s, heavy's second replay (6 s, its own median) would overrun 10 s and is not started,
    # but light, never measured, is expected to take the median of all replays (1 s) and fits
    machine = FakeMachine({"default": (1000, 100, 20), "heavy": (500, 100, 20), "light": (1100, 100, 20)})
    durations = {"default": 1.0, "heavy": 6.0, "light": 1.0}

    def measure(settings: dict) -> Measurement:
        machine.seconds = durations[settings["name"]]
        return machine.measure(settings)

    result = Search([(n, {"name": n}) for n in durations], measure, None, 10.0, clock=machine.clock,
                    min_rounds=2).run()  # min_rounds=2: heavy is cut by the budget, not by early stopping
    assert machine.calls == ["default", "heavy", "default", "light", "default"]
    assert any(line.startswith("heavy: replay not started: 6.0 s expected") for line in result.log)
    assert all(start + duration <= 10.0 for start, duration in machine.starts)


# --- Search: drift --------------------------------------------------------------------------

def test_interleaving_sees_through_a_drifting_machine():
    truth = {"default": (1000, 100, 20), "a": (1100, 100, 20), "b": (1150, 100, 20), "c": (900, 100, 20)}
    machine = FakeMachine(truth, drift=0.01)
    result = search(machine, list(truth), rounds=3).run()

    # the drift is large enough to mislead: b's raw replays look slower than a's
    def raw(key: str) -> float:
        runs = sorted(r.measurement.throughput_tok_s for r in result.replays if r.key == key and r.against)
        return runs[len(runs) // 2]
    assert raw("b") < raw("a")

    assert result.chosen.key == "b"
    assert result.gain == pytest.approx(1150 / 1000, rel=0.02)
    assert result.front == [result.chosen]
    assert machine.calls.count("c") == 1  # 22% slower than b: stopped after one replay


def test_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no candidates"):
        Search([], lambda s: m(1), None, 10)
    with pytest.raises(ValueError, match="repeat"):
        Search([("a", {}), ("a", {})], lambda s: m(1), None, 10)
    with pytest.raises(ValueError, match="min_rounds"):
        Search([("a", {})], lambda s: m(1), None, 10, rounds=2, min_rounds=3)
