"""Shared timing helpers: the fast path and its baseline are timed by the same clock in the same run."""
import statistics
import time

import torch


def median_seconds(fn, repeat: int, sync_cuda: bool = False) -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        if sync_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def record(benchmark, line: str, **info):
    """Ratios and baselines go into pytest-benchmark's JSON (extra_info) and onto stdout."""
    benchmark.extra_info.update(info)
    print("\n" + line)
