"""GAE: the fast path against the readable Python loop and the vectorised (per-time-step) torch
baseline, in the same run. Read the ratios; absolute times on shared machines are noise.

CPU: ``gae`` = the two-level parallel scan. CUDA (skipped without a GPU): the Triton kernel
against the same vectorised baseline on the GPU (the issue's bar: >= 10x at T=512, N=64).
Under ``--benchmark-disable`` each case runs once, checked against the loop, with no timings.
"""
import time

import pytest
import torch
from _timing import median_seconds, record

from vlarl_fast.kernels import gae, gae_reference, gae_stepwise

SHAPES = [(512, 64), (128, 1024)]


def _inputs(T, N, device="cpu"):
    g = torch.Generator().manual_seed(0)
    term = (torch.rand(T, N, generator=g) < 0.02).float()
    trunc = (torch.rand(T, N, generator=g) < 0.01).float()
    args = (torch.randn(T, N, generator=g), torch.randn(T, N, generator=g), torch.randn(T, N, generator=g),
            term, torch.clamp(term + trunc, max=1))
    return tuple(a.to(device) for a in args)


@pytest.mark.parametrize("T,N", SHAPES)
def test_gae_cpu_vs_python_loop_and_vectorised(benchmark, T, N):
    args = _inputs(T, N)
    t0 = time.perf_counter()
    ref, _ = gae_reference(*args, 0.99, 0.95)
    loop_s = time.perf_counter() - t0
    adv, _ = benchmark(gae, *args, 0.99, 0.95)
    torch.testing.assert_close(adv, ref, rtol=1e-5, atol=1e-5)
    if benchmark.disabled:
        return
    fast_s = median_seconds(lambda: gae(*args, 0.99, 0.95), 50)
    step_s = median_seconds(lambda: gae_stepwise(*args, 0.99, 0.95), 20)
    record(benchmark,
           f"GAE CPU T={T} N={N}: Python loop {loop_s * 1e3:.1f} ms, vectorised per-step {step_s * 1e3:.2f} ms, "
           f"scan {fast_s * 1e3:.3f} ms -> x{loop_s / fast_s:.0f} vs loop, x{step_s / fast_s:.1f} vs vectorised",
           python_loop_s=loop_s, vectorised_s=step_s, fast_s=fast_s,
           speedup_vs_loop=loop_s / fast_s, speedup_vs_vectorised=step_s / fast_s)
    if (T, N) == (512, 64):
        assert loop_s / fast_s >= 20, "the CPU path must be >= 20x the Python loop at T=512, N=64"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA benchmark: no GPU here")
@pytest.mark.parametrize("T,N", SHAPES)
def test_gae_triton_vs_vectorised_cuda(benchmark, T, N):
    args = _inputs(T, N, device="cuda")
    ref, _ = gae_reference(*(a.cpu() for a in args), 0.99, 0.95)

    def fast():
        out = gae(*args, 0.99, 0.95)  # CUDA tensors: the Triton kernel
        torch.cuda.synchronize()
        return out

    adv, _ = benchmark(fast)
    torch.testing.assert_close(adv.cpu(), ref, rtol=1e-5, atol=1e-5)
    if benchmark.disabled:
        return
    fast_s = median_seconds(lambda: gae(*args, 0.99, 0.95), 100, sync_cuda=True)
    step_s = median_seconds(lambda: gae_stepwise(*args, 0.99, 0.95), 20, sync_cuda=True)
    record(benchmark,
           f"GAE {torch.cuda.get_device_name()} T={T} N={N}: vectorised per-step {step_s * 1e3:.2f} ms, "
           f"Triton {fast_s * 1e3:.3f} ms -> x{step_s / fast_s:.1f}",
           device=torch.cuda.get_device_name(), vectorised_s=step_s, fast_s=fast_s,
           speedup_vs_vectorised=step_s / fast_s)
