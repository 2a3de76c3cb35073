"""One Session protocol: every session class has its members with step's one signature, declared
capabilities are read from engine.json (derived once for older files) and refused where the
session cannot honour them or the graph contradicts them."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest

from compiler.runtime import load
from compiler.runtime.config import Capabilities, EngineConfig, InvalidEngineConfig
from compiler.runtime.cuda_session import CudaDecoderSession
from compiler.runtime.distributed import DistributedSession
from compiler.runtime.session import DecoderSession
from compiler.runtime.session_api import Session, checked
from compiler.runtime.tensorrt_session import TensorRTSession
from compiler.runtime.verify import record
from tests.runtime.fake_session import FakeEngine

METHODS = ("new_cache", "cache_rows", "binding", "step", "release_row", "kv_arrays")


@pytest.mark.parametrize("cls", [DecoderSession, CudaDecoderSession, TensorRTSession, DistributedSession])
def test_every_session_class_has_the_protocol_members(cls):
    for name in METHODS:
        assert callable(getattr(cls, name)), name
    want = list(inspect.signature(Session.step).parameters)
    assert list(inspect.signature(cls.step).parameters) == want
    assert isinstance(cls.SUPPORTS, Capabilities)


def test_the_fake_session_is_a_session():
    assert isinstance(FakeEngine().session, Session)


def test_capabilities_a_session_cannot_honour_are_refused():
    device = Capabilities(sliceable=False, paged=False)
    assert checked(device, TensorRTSession.SUPPORTS, "TensorRT") == device
    with pytest.raises(InvalidEngineConfig, match="declares sliceable, paged but a TensorRT session cannot"):
        checked(Capabilities(), TensorRTSession.SUPPORTS, "TensorRT")
    with pytest.raises(InvalidEngineConfig, match="declares samples but a multi-rank session"):
        checked(Capabilities(sliceable=False, paged=False, samples=True), DistributedSession.SUPPORTS, "multi-rank")


def _edit_engine(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    d = json.loads((dst / "engine.json").read_text())
    edit(d)
    (dst / "engine.json").write_text(json.dumps(d))
    m = json.loads((dst / "kiln.json").read_text())
    record(m, [dst / "engine.json"])  # a consistent artifact: only what engine.json says is at stake
    (dst / "kiln.json").write_text(json.dumps(m))


@pytest.mark.parametrize("graph", ["contrib", "standard"])
def test_backends_declare_capabilities_and_older_files_derive_the_same(tiny_artifacts, tmp_path, graph):
    art = tiny_artifacts[("llama", graph)]
    declared = EngineConfig.load(art / "engine.json").capabilities
    assert declared == Capabilities(multi_token_rows=graph == "standard")
    _edit_engine(art, tmp_path / "old", lambda d: d.pop("capabilities"))
    assert load(tmp_path / "old").session.capabilities == declared


def test_a_graph_that_contradicts_its_capabilities_is_refused(tiny_artifacts, tmp_path):
    art = tiny_artifacts[("llama", "contrib")]
    _edit_engine(art, tmp_path / "lies", lambda d: d["capabilities"].update(samples=True))
    with pytest.raises(InvalidEngineConfig, match="samples=True but model.onnx lacks kiln::Sample's inputs"):
        load(tmp_path / "lies")
    _edit_engine(art, tmp_path / "typo", lambda d: d["capabilities"].update(sliced=True))
    with pytest.raises(InvalidEngineConfig, match="not a valid kiln engine config"):
        load(tmp_path / "typo")
