"""Wall-clock helper shared by the per-image benches (run from ``bench/``)."""
from __future__ import annotations

import statistics
import time


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn``, after one call off the clock
    (first-call allocations)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
