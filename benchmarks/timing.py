"""Timing shared by the benchmark scripts: CUDA events on a GPU, perf_counter medians on a CPU."""

from __future__ import annotations

import statistics
import time


def time_ms(fn, device) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn(): triton.testing.do_bench (CUDA events, after
    warm-up) on a GPU; five perf_counter samples after one warm-up call on a CPU (--smoke runs)."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    fn()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[1], samples[-2]
