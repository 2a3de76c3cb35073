"""Workload files: the shipped ones load, length distributions sample what they declare, and bad
input is refused with a one-line KilnError that names the file, the field and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from compiler.errors import KilnError
from compiler.tune.workload import WORKLOADS_DIR, Fixed, Histogram, Uniform, known_workloads, load_workload, parse_workload

SHIPPED = ("chat", "generate", "summarise")


def _base(**fields) -> dict:
    doc = {"schema": 1, "name": "t", "input_tokens": {"kind": "uniform", "min": 10, "max": 20},
           "output_tokens": {"kind": "fixed", "value": 8}, "arrival": {"concurrency": 2}}
    return {**doc, **fields}


def _write(tmp_path, doc, name="w.yaml"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def _refused(tmp_path, doc) -> str:
    path = _write(tmp_path, doc)
    with pytest.raises(KilnError) as e:
        load_workload(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and e.value.fix
    return message


def test_shipped_workloads_load_by_name_and_by_path():
    assert set(SHIPPED) <= set(known_workloads())
    for name in SHIPPED:
        w = load_workload(name)
        assert w.name == name and w == load_workload(WORKLOADS_DIR / f"{name}.yaml")
        assert w.arrival.closed_loop


def test_shipped_targets():
    chat, summarise, generate = (load_workload(n) for n in ("chat", "summarise", "generate"))
    assert chat.targets.kind == "itl_p99_ms" and chat.targets.latency_keys() == ("ttft_p99_ms", "itl_p99_ms")
    assert chat.shared_prefix == 0.5
    assert summarise.targets.kind == "ttft_p99_ms" and summarise.targets.latency_keys() == ("ttft_p99_ms",)
    assert summarise.input_tokens.mean() > 5 * summarise.output_tokens.mean()  # long in, short out
    assert generate.targets.kind == "max_throughput" and generate.targets.latency_keys() == ()
    assert generate.output_tokens.mean() > 3 * generate.input_tokens.mean()  # short in, long out


def test_defaults_and_open_loop(tmp_path):
    w = load_workload(_write(tmp_path, _base(arrival={"rate_per_s": 2.5})))
    assert (w.requests, w.seed, w.shared_prefix, w.description) == (48, 0, 0.0, "")
    assert not w.arrival.closed_loop and w.arrival.rate_per_s == 2.5
    assert w.targets.kind == "max_throughput"


def test_uniform_samples_within_bounds():
    d = Uniform(kind="uniform", min=10, max=20)
    x = d.sample(np.random.default_rng(1), 2000)
    assert x.min() >= 10 and x.max() <= 20 and {10, 20} <= set(x.tolist())
    assert abs(x.mean() - 15) < 0.5 and d.mean() == 15


def test_fixed_samples_its_value():
    d = Fixed(kind="fixed", value=7)
    assert d.sample(np.random.default_rng(0), 5).tolist() == [7] * 5 and d.mean() == 7


def test_histogram_bin_frequencies_follow_the_weights():
    d = Histogram(kind="histogram", bins=[(1, 10, 1), (100, 110, 2), (500, 500, 7)])
    x = d.sample(np.random.default_rng(3), 20000)
    freq = [np.mean((x >= 1) & (x <= 10)), np.mean((x >= 100) & (x <= 110)), np.mean(x == 500)]
    assert np.allclose(freq, [0.1, 0.2, 0.7], atol=0.02) and sum(freq) == pytest.approx(1.0)
    assert d.mean() == pytest.approx(0.1 * 5.5 + 0.2 * 105 + 0.7 * 500)


@pytest.mark.parametrize("fields, field, reason", [
    ({"colour": "red"}, "colour", "unknown field"),
    ({"arrival": {"concurrency": 2, "burst": 3}}, "arrival.burst", "unknown field"),
    ({"input_tokens": {"kind": "uniform", "min": 20, "max": 10}}, "input_tokens", "min 20 is greater than max 10"),
    ({"input_tokens": {"kind": "uniform", "min": 0, "max": 10}}, "input_tokens.min", "greater than or equal to 1"),
    ({"output_tokens": {"kind": "histogram", "bins": [[1, 4, 1], [5, 9, 0]]}}, "output_tokens.bins.1.2", "greater than 0"),
    ({"output_tokens": {"kind": "histogram", "bins": [[1, 4, -2]]}}, "output_tokens.bins.0.2", "greater than 0"),
    ({"output_tokens": {"kind": "histogram", "bins": [[9, 4, 1]]}}, "output_tokens", "bin 0: lo 9 is greater than hi 4"),
    ({"output_tokens": {"kind": "histogram", "bins": []}}, "output_tokens.bins", "at least 1"),
    ({"output_tokens": {"kind": "normal", "mean": 5}}, "output_tokens", "does not match any of the expected tags"),
    ({"arrival": {"concurrency": 4, "rate_per_s": 2.0}}, "arrival", "exactly one of concurrency"),
    ({"arrival": {}}, "arrival", "neither is given"),
    ({"arrival": {"rate_per_s": 0}}, "arrival.rate_per_s", "greater than 0"),
    ({"shared_prefix": 1.5}, "shared_prefix", "less than or equal to 1"),
    ({"requests": 0}, "requests", "greater than or equal to 1"),
    ({"targets": {"ttft_p99_ms": 100, "tpot_ms": 5}}, "targets.tpot_ms", "unknown field"),
    ({"schema": 2}, "schema", "Input should be 1"),
])
def test_bad_fields_are_refused_by_name(tmp_path, fields, field, reason):
    message = _refused(tmp_path, _base(**fields))
    assert f"field '{field}'" in message and reason in message and "workloads/chat.yaml" in message


def test_missing_required_field(tmp_path):
    doc = _base()
    del doc["output_tokens"]
    assert "field 'output_tokens': required field is missing" in _refused(tmp_path, doc)


def test_both_targets_are_kept():
    w = parse_workload(_base(targets={"ttft_p99_ms": 500, "itl_p99_ms": 50}))
    assert (w.targets.ttft_p99_ms, w.targets.itl_p99_ms) == (500, 50)
    assert w.targets.latency_keys() == ("ttft_p99_ms", "itl_p99_ms")


def test_not_yaml_and_not_a_mapping(tmp_path):
    assert "is not valid YAML" in _refused(tmp_path, "schema: 1\nname: [unclosed\n")
    assert "must be a YAML mapping" in _refused(tmp_path, "- just\n- a list\n")
    assert "must be a YAML mapping" in _refused(tmp_path, "")


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(KilnError, match="does not exist") as e:
        load_workload(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(e.value) and "chat" in e.value.fix
    with pytest.raises(KilnError, match="no workload named 'nosuch'") as e:
        load_workload("nosuch")
    assert "chat" in str(e.value) and "path" in e.value.fix


def test_workload_path_resolves_names_and_paths(tmp_path):
    from compiler.tune.workload import workload_path

    assert workload_path("chat") == WORKLOADS_DIR / "chat.yaml"
    path = _write(tmp_path, _base())
    assert workload_path(str(path)) == path and workload_path(path) == path
    with pytest.raises(KilnError, match="no workload named"):
        workload_path("nosuch")
