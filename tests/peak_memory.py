"""Peak memory of a piece of work: what the tests of bounded requests assert on."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

MIB = 2**20


def peak_memory(work: Callable[[], T]) -> tuple[T, int]:
    """What `work()` returns, and the most bytes Python and NumPy held at once while it ran.

    An exception from `work` propagates (tracing stops either way).
    """
    tracemalloc.start()
    try:
        result = work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak
