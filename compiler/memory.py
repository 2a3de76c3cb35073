"""Returning freed memory to the OS between build stages, so a build's peak RSS is its largest
stage rather than the sum of what earlier stages freed but glibc kept."""

from __future__ import annotations

import gc


def return_freed_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
