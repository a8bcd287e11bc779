"""Timing shared by the benchmark scripts: CUDA events on a GPU, perf_counter medians on a CPU;
providers' steps alternated step by step; a time limit for a compile; CUDA-graph replays."""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time

import torch


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


def quantiles(times: list) -> tuple[float, float, float]:
    """(median, p20, p80) of sorted times."""
    return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]


def round_order(names: list, i: int, last=None) -> list:
    """The providers of round i: rotated to start with provider i mod n (each provider runs at
    every position equally often, so that what ran before it lands on all of them), and turned
    once more when that would run the provider that ended the previous round again (two
    providers: A B A B ..., not A B B A)."""
    n = len(names)
    order = names[i % n:] + names[:i % n]
    if n > 1 and order[0] == last:
        order = order[1:] + order[:1]
    return order


def alternated(steps: dict, device, rounds: int, warmup: int, log: list | None = None) -> tuple[dict, dict, dict]:
    """Time each provider's step `rounds` times after `warmup` untimed rounds, the providers
    alternated step by step (round_order). Returns per provider the sorted ms, the peak memory
    (MiB, GPU only: max over the timed steps of the step's peak above what was allocated before
    it) and the exception that stopped it, if any. `log`, when given, receives the provider of
    every timed step in the order they ran."""
    cuda = device.type == "cuda"
    times = {p: [] for p in steps}
    peaks = {p: None for p in steps}
    failed = {}
    names, last = list(steps), None
    for i in range(warmup + rounds):
        order = round_order([p for p in names if p not in failed], i, last)
        for p in order:
            try:
                if cuda:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                t0 = time.perf_counter()
                steps[p]()
                if cuda:
                    torch.cuda.synchronize(device)
                ms = (time.perf_counter() - t0) * 1e3
            except Exception as exc:  # reported in the row, not dropped
                failed[p] = exc
                continue
            last = p
            if i >= warmup:
                times[p].append(ms)
                if log is not None:
                    log.append(p)
                if cuda:
                    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                    peaks[p] = peak if peaks[p] is None else max(peaks[p], peak)
    return {p: sorted(t) for p, t in times.items()}, peaks, failed


class TimeLimit(TimeoutError):
    """Raised inside a `time_limit` block that ran past its seconds."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "the call"):
    """Raise TimeLimit in this block after `seconds` (SIGALRM on the main thread; yields True).
    Where that cannot be armed (not the main thread, no SIGALRM) or seconds is None, the block
    runs without a limit and this yields False, which the caller records."""
    armed = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
             and threading.current_thread() is threading.main_thread())
    if not armed:
        yield False
        return

    def expire(signum, frame):
        raise TimeLimit(f"{what} ran past its limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def warm(step, device, cap_s: float | None) -> dict:
    """A compiling provider's first call, before its timed region: the compile (torch.compile
    traces and builds on the first call with new shapes) and one run, under its own time limit
    `cap_s` (TimeLimit past it), so that the compile neither counts in the timing nor runs into
    the caller's. Returns the row fields compile_s (seconds of that first call, synchronised)
    and compile_cap_s (None where no limit could be armed)."""
    t0 = time.perf_counter()
    with time_limit(cap_s, "compile (the first call)") as armed:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return dict(compile_s=time.perf_counter() - t0, compile_cap_s=cap_s if armed else None)


NO_GRAPH_ON_CPU = "no CUDA device: CUDA graphs need a GPU"


def graph_replay_ms(step, device, check=None, warmup: int = 3) -> tuple[tuple, object]:
    """((median, p20, p80) ms of replaying one captured step, check(output of a replay) or None),
    or raises what the capture raised. The step is warmed on a side stream first (as torch's CUDA
    graph notes ask), captured once in a torch.cuda.CUDAGraph, replayed once and checked, then
    timed with time_ms (the same CUDA events and L2 flushes as the eager timing)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize(device)
    checked = None if check is None else check(out)
    del out
    return time_ms(graph.replay, device), checked
