"""Triton reads TRITON_INTERPRET when `triton` is first imported: test sessions set it before
anything imports triton (torch, transformers), so plugin kernels run under the interpreter on a
machine without a GPU and natively on one with a GPU."""

from __future__ import annotations

import os


def interpret_without_gpu() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"
