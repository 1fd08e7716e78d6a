"""Helpers shared by the benchmarks: medians of repeated timings and GB/s.

Promises: every figure is a median of ``repeats`` runs (these machines are noisy); ``gbps`` is 10**9 bytes
per second.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(run: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> float:
    """The median wall time of ``run()`` over ``repeats`` runs, each after an untimed ``setup()``."""
    times: list[float] = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gbps(num_bytes: int, seconds: float) -> float:
    return round(num_bytes / seconds / 1e9, 3) if seconds > 0 else float("inf")
