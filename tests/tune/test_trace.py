"""Traces: deterministic for a seed, lengths that follow the workload, a shared prefix of the
declared share, lengths clipped to the engine's max_seq, no avoided token id, Poisson arrivals."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import KilnError
from compiler.tune.trace import TraceRequest, make_trace, summary
from compiler.tune.workload import known_workloads, load_workload, parse_workload

VOCAB = 1000


def _workload(**fields):
    doc = {"schema": 1, "name": "t", "requests": 64, "input_tokens": {"kind": "uniform", "min": 10, "max": 20},
           "output_tokens": {"kind": "uniform", "min": 4, "max": 8}, "arrival": {"concurrency": 4}, **fields}
    return parse_workload(doc)


def test_same_seed_same_trace_other_seed_other_trace():
    a, b = make_trace(_workload(), VOCAB, 256), make_trace(_workload(), VOCAB, 256)
    assert a == b and all(isinstance(r, TraceRequest) for r in a)
    c = make_trace(_workload(seed=1), VOCAB, 256)
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert [r.index for r in a] == list(range(64))


def test_tokens_are_python_ints_in_the_vocabulary():
    trace = make_trace(_workload(), VOCAB, 256)
    assert all(type(t) is int and 0 <= t < VOCAB for r in trace for t in r.prompt)
    assert all(type(r.max_new_tokens) is int and type(r.arrival_s) is float for r in trace)


def test_lengths_follow_the_distributions():
    trace = make_trace(_workload(requests=2000), VOCAB, 4096)
    inputs = np.array([len(r.prompt) for r in trace])
    outputs = np.array([r.max_new_tokens for r in trace])
    assert inputs.min() >= 10 and inputs.max() <= 20 and abs(inputs.mean() - 15) < 0.5
    assert outputs.min() >= 4 and outputs.max() <= 8 and abs(outputs.mean() - 6) < 0.5


def test_histogram_lengths_in_the_trace():
    w = _workload(requests=4000, input_tokens={"kind": "histogram", "bins": [[5, 9, 3], [50, 60, 1]]})
    inputs = np.array([len(r.prompt) for r in make_trace(w, VOCAB, 4096)])
    assert np.all(((inputs >= 5) & (inputs <= 9)) | ((inputs >= 50) & (inputs <= 60)))
    assert abs(np.mean(inputs <= 9) - 0.75) < 0.03


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 1.0])
def test_shared_prefix(share):
    w = _workload(shared_prefix=share, input_tokens={"kind": "uniform", "min": 20, "max": 200})
    trace = make_trace(w, VOCAB, 1024)
    longest = max(trace, key=lambda r: round(share * len(r.prompt)))
    prefix = longest.prompt[: round(share * len(longest.prompt))]
    for r in trace:
        own = round(share * len(r.prompt))
        assert r.prompt[:own] == prefix[:own]
    assert summary(trace)["shared_prefix_tokens"] >= min(round(share * len(r.prompt)) for r in trace)
    if share == 0.0:  # random tokens: prompts do not share a prefix beyond chance
        assert summary(trace)["reusable_prefix_tokens"] < 1


def test_shared_prefix_of_the_chat_workload():
    w = load_workload("chat")
    trace = make_trace(w, 49152, 2048)
    s = summary(trace)
    assert s["shared_prefix_tokens"] == min(round(0.5 * len(r.prompt)) for r in trace)
    assert s["reusable_prefix_tokens"] >= np.mean([round(0.5 * len(r.prompt)) for r in trace]) - 1


def test_clipped_to_max_seq_prompt_first():
    w = _workload(input_tokens={"kind": "fixed", "value": 300}, output_tokens={"kind": "fixed", "value": 50})
    assert {(len(r.prompt), r.max_new_tokens) for r in make_trace(w, VOCAB, 200)} == {(150, 50)}
    w = _workload(input_tokens={"kind": "fixed", "value": 300}, output_tokens={"kind": "fixed", "value": 500})
    assert {(len(r.prompt), r.max_new_tokens) for r in make_trace(w, VOCAB, 200)} == {(1, 199)}
    w = _workload(input_tokens={"kind": "uniform", "min": 1, "max": 3000},
                  output_tokens={"kind": "uniform", "min": 1, "max": 3000}, requests=500)
    for r in make_trace(w, VOCAB, 2048):
        assert len(r.prompt) >= 1 and r.max_new_tokens >= 1 and len(r.prompt) + r.max_new_tokens <= 2048


def test_shipped_workloads_fit_max_seq_2048():
    for name in known_workloads():
        for r in make_trace(load_workload(name), 49152, 2048):
            assert len(r.prompt) + r.max_new_tokens <= 2048


def test_avoided_ids_never_appear():
    avoid = frozenset(range(0, VOCAB, 2)) | {999}  # every even id and the last
    w = _workload(requests=200, shared_prefix=0.5)
    seen = {t for r in make_trace(w, VOCAB, 256, avoid_ids=avoid) for t in r.prompt}
    assert seen and not seen & avoid and len(seen) > 100
    only = {t for r in make_trace(w, 3, 256, avoid_ids=frozenset({0, 2})) for t in r.prompt}
    assert only == {1}


def test_poisson_arrivals():
    rate = 4.0
    trace = make_trace(_workload(requests=2000, arrival={"rate_per_s": rate}), VOCAB, 256)
    arrivals = np.array([r.arrival_s for r in trace])
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 1 / rate) < 0.1 / rate
    assert abs(gaps.std() - 1 / rate) < 0.15 / rate  # exponential: std == mean
    assert summary(trace)["last_arrival_s"] == arrivals[-1]


def test_closed_loop_arrivals_are_zero():
    assert {r.arrival_s for r in make_trace(_workload(), VOCAB, 256)} == {0.0}


def test_summary():
    w = _workload(input_tokens={"kind": "fixed", "value": 12}, output_tokens={"kind": "fixed", "value": 5}, requests=10)
    s = summary(make_trace(w, VOCAB, 256))
    assert s["count"] == 10
    assert s["input_tokens"] == {"mean": 12.0, "p50": 12.0, "p99": 12.0}
    assert s["output_tokens"] == {"mean": 5.0, "p50": 5.0, "p99": 5.0}
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (120, 50)
    assert summary([])["count"] == 0


def test_bad_engine_sizes_are_refused():
    with pytest.raises(KilnError, match="max_seq 1"):
        make_trace(_workload(), VOCAB, 1)
    with pytest.raises(KilnError, match="every token id"):
        make_trace(_workload(), 2, 256, avoid_ids=frozenset({0, 1}))
