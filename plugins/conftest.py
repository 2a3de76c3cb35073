"""Fixtures of the plugin tests: a tiny random-weight Llama graph built offline by the frontend."""

from __future__ import annotations

import pytest

from plugins._interpret import interpret_without_gpu, skip_gpu_tests

interpret_without_gpu()


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests(items)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from compiler.frontend import models
    from compiler.frontend.checkpoint import Checkpoint
    from tests.conftest import make_tiny

    src = make_tiny("llama", tmp_path_factory.mktemp("plugins") / "llama")

    def build():
        ckpt = Checkpoint.open(src)
        arch = models.lookup(ckpt.config)
        return arch.build(arch.config(ckpt.config), ckpt, 64)

    return build
