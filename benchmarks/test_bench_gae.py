"""GAE: the vectorised scan against the readable Python loop, in the same run.

The ratio (loop time / vectorised time) is what to read; absolute times on shared machines are noise.
"""
import time

import pytest
import torch

from vlarl_fast.kernels import gae, gae_reference


def _inputs(T, N):
    g = torch.Generator().manual_seed(0)
    term = (torch.rand(T, N, generator=g) < 0.02).float()
    return (torch.randn(T, N, generator=g), torch.randn(T, N, generator=g), torch.randn(T, N, generator=g),
            term, term)


@pytest.mark.parametrize("T,N", [(128, 16), (512, 64)])
def test_gae_vectorised_vs_python_loop(benchmark, T, N):
    args = _inputs(T, N)
    t0 = time.perf_counter()
    ref, _ = gae_reference(*args, 0.99, 0.95)
    loop_s = time.perf_counter() - t0
    adv, _ = benchmark(gae, *args, 0.99, 0.95)
    torch.testing.assert_close(adv, ref, rtol=1e-5, atol=1e-5)
    fast_s = benchmark.stats.stats.mean if benchmark.stats else None
    if fast_s:
        benchmark.extra_info["python_loop_s"] = loop_s
        benchmark.extra_info["speedup_vs_loop"] = loop_s / fast_s
        print(f"\nGAE T={T} N={N}: loop {loop_s * 1e3:.1f} ms, vectorised {fast_s * 1e3:.2f} ms, "
              f"x{loop_s / fast_s:.0f}")
