"""`kiln support` reads the matrix that `make support-matrix` writes (scripts/support_matrix.py):
the reader against small matrix files under tmp_path (never the tracked one), the script's
cell bookkeeping, and one real cell check (llama, onnxruntime, fp32)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from compiler.ship import support
from compiler.cli import main
from compiler.errors import KilnError
from compiler.frontend.models import REGISTRY
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("support_matrix_script", ROOT / "scripts" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def cell(arch, backend, precision, status="passed", check="transformers_parity", detail="ok"):
    return {"architecture": arch, "backend": backend, "precision": precision, "check": check, "status": status,
            "detail": detail, "seconds": 1.0}


SMALL = {"schema": support.SCHEMA, "generated": "2026-12-01", "cells": [
    cell("LlamaForCausalLM", "onnxruntime", "float32", detail="max |logit diff| 4e-08"),
    cell("LlamaForCausalLM", "onnxruntime", "float32+int4-rtn", check="close_to_fp32_engine"),
    cell("LlamaForCausalLM", "tensorrt", "float16", status="skipped", check="tensorrt_plan_targets",
         detail="neither tensorrt_rtx nor tensorrt is importable"),
    cell("Qwen2ForCausalLM", "onnxruntime", "float32", status="failed", detail="greedy tokens differ at new token 3"),
]}


@pytest.fixture
def matrix(tmp_path, monkeypatch):
    """SMALL in a file under tmp_path, which `kiln support` reads in place of the tracked one."""
    path = tmp_path / "support_matrix.json"
    path.write_text(json.dumps(SMALL))
    monkeypatch.setattr(support, "MATRIX_FILE", path)
    return path


def test_table_has_every_cell_with_its_check_and_status(matrix):
    t = support.table()
    assert t["generated"] == "2026-12-01"
    assert t["columns"] == ["onnxruntime/float32", "onnxruntime/float32+int4-rtn", "tensorrt/float16"]
    assert set(t["rows"]) == set(REGISTRY)  # every architecture has a row, checked or not
    assert t["rows"]["LlamaForCausalLM"]["tensorrt/float16"] == {
        "check": "tensorrt_plan_targets", "status": "skipped", "detail": "neither tensorrt_rtx nor tensorrt is importable"}
    assert t["rows"]["Qwen2ForCausalLM"] == {"onnxruntime/float32": {
        "check": "transformers_parity", "status": "failed", "detail": "greedy tokens differ at new token 3"}}
    assert t["rows"]["MistralForCausalLM"] == {}


def test_kiln_support_text_and_json(matrix, capsys):
    assert main(["support"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["architecture", "onnxruntime", "tensorrt"]
    rows = {line.split()[0]: line for line in lines[2:] if line[:1].strip() and line.split()[0] in REGISTRY}
    assert rows["LlamaForCausalLM"].split(None, 1)[1].split("  ")[0] == "float32, float32+int4-rtn"
    assert "float16 (skipped)" in rows["LlamaForCausalLM"]
    assert "float32 (FAILED)" in rows["Qwen2ForCausalLM"]
    assert rows["MistralForCausalLM"].split()[1:] == ["-", "-"]
    assert "  Qwen2ForCausalLM onnxruntime/float32 [transformers_parity] failed: greedy tokens differ at new token 3" in lines
    assert any(line.startswith("  LlamaForCausalLM tensorrt/float16 [tensorrt_plan_targets] skipped:") for line in lines)
    assert not any("LlamaForCausalLM onnxruntime/float32 [" in line for line in lines)  # passed cells: no reason line
    assert main(["support", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == support.table()


@pytest.mark.parametrize("content,why", [
    ('{"generated": "2026-11-29", "cells": [["LlamaForCausalLM", "onnxruntime", "float32"]]}', "schema-2 support matrix"),
    ("{not json", "not readable JSON"),
    (json.dumps({**SMALL, "cells": [{**SMALL["cells"][0], "status": "covered"}]}), "a cell without"),
    (json.dumps({**SMALL, "cells": [{k: v for k, v in SMALL["cells"][0].items() if k != "check"}]}), "a cell without"),
])
def test_a_matrix_in_another_format_is_refused_in_one_line(tmp_path, monkeypatch, capsys, content, why):
    path = tmp_path / "support_matrix.json"
    path.write_text(content)
    with pytest.raises(KilnError, match=why) as e:
        support.table(path)
    assert "make support-matrix" in e.value.fix
    monkeypatch.setattr(support, "MATRIX_FILE", path)
    assert main(["support"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err


def test_no_matrix_file_shows_empty_rows(tmp_path):
    t = support.table(tmp_path / "missing.json")
    assert t["generated"] is None and t["columns"] == [] and all(row == {} for row in t["rows"].values())
    assert "never (run `make support-matrix`)" in support.text(t)


def test_the_tracked_matrix_is_in_the_format_kiln_support_reads():
    record = support.covered()  # read only
    assert record["cells"], "compiler/support_matrix.json has no cell: run `make support-matrix`"
    assert {c["architecture"] for c in record["cells"]} <= set(REGISTRY)


def test_every_registered_architecture_has_a_checked_cell(script):
    cells = script.default_cells()
    fp32 = {c.architecture for c in cells if (c.backend, c.precision) == ("onnxruntime", "float32")}
    assert fp32 == set(REGISTRY), "an architecture of the registry without a cell in scripts/support_matrix.py"
    assert all(c.check in script.CHECKS for c in cells) and len({c.key for c in cells}) == len(cells)


def test_run_cell_records_failed_and_skipped_with_the_reason(script, tmp_path, monkeypatch):
    def failing(c, shop):
        raise script.Failed("relative logit error 0.9 (bound 0.25)")

    def skipping(c, shop):
        raise script.Skipped("no CUDAExecutionProvider")

    def crashing(c, shop):
        raise KilnError("max_seq 512 exceeds the model's max_position_embeddings 256", "lower max_seq")

    shop = script.Workshop(tmp_path)
    for check, fn in (("failing", failing), ("skipping", skipping), ("crashing", crashing)):
        monkeypatch.setitem(script.CHECKS, check, fn)
    got = {check: script.run_cell(script.Cell("llama", "onnxruntime", "float32", check), shop)
           for check in ("failing", "skipping", "crashing")}
    assert (got["failing"]["status"], got["failing"]["detail"]) == ("failed", "relative logit error 0.9 (bound 0.25)")
    assert (got["skipping"]["status"], got["skipping"]["detail"]) == ("skipped", "no CUDAExecutionProvider")
    assert got["crashing"]["status"] == "failed" and got["crashing"]["detail"].startswith("KilnError: max_seq 512 exceeds")
    assert got["failing"]["architecture"] == "LlamaForCausalLM" and got["failing"]["check"] == "failing"


def test_only_without_out_is_refused(script, capsys):
    assert script.main(["--only", "Llama"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("pass --out FILE with --only")


def test_one_real_cell_llama_onnxruntime_fp32(script, tmp_path):
    """The cell's check builds a tiny llama, runs it against transformers and passes; written
    with --out into tmp_path, `kiln support` reads it."""
    record = script.run([script.Cell("llama", "onnxruntime", "float32", "transformers_parity")], tmp_path / "work",
                        progress=False)
    [c] = record["cells"]
    assert (c["architecture"], c["backend"], c["precision"], c["check"]) == (
        "LlamaForCausalLM", "onnxruntime", "float32", "transformers_parity")
    assert c["status"] == "passed", c["detail"]
    assert f"{script.GREEDY_TOKENS} greedy tokens equal" in c["detail"]
    out = tmp_path / "matrix.json"
    out.write_text(json.dumps(record))
    assert support.table(out)["rows"]["LlamaForCausalLM"]["onnxruntime/float32"]["status"] == "passed"
