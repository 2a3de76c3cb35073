"""Test-session set-up shared by tests/ and plugins/: Triton reads TRITON_INTERPRET when `triton`
is first imported, so sessions set it before anything imports triton (plugin kernels then run
under the interpreter without a GPU, natively with one); and `gpu`-marked tests are skipped
where there is no GPU."""

from __future__ import annotations

import os


def interpret_without_gpu() -> None:
    if "TRITON_INTERPRET" not in os.environ and not has_gpu():
        os.environ["TRITON_INTERPRET"] = "1"


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def skip_gpu_tests(items) -> None:
    """`gpu`-marked tests are skipped cleanly on machines without a CUDA GPU (CI, dev boxes)."""
    if has_gpu():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
