"""Peak CPU memory of action_logprobs fwd+bwd against the naive full-logits baseline.

Run as ``python -m vlarl_fast.kernels.memory_probe N H V WEIGHT_SCALE``; ``cpu_peaks`` does that in
a fresh process and returns ``{"fused": bytes, "naive": bytes}``. Each figure is the high-water RSS
(VmHWM, reset through /proc/self/clear_refs before the call) above the RSS just before it, with
glibc told to mmap every block over 64 KiB so a freed temporary leaves RSS at once: the peak of
live bytes, including the d hidden / d weight the call returns. VmHWM is this process's own
(ru_maxrss can carry a parent's across fork + exec). Linux only (reads /proc/self/status).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _reset_high_water() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        pass  # without the reset VmHWM only grows: measuring the fused path first keeps its figure honest


def measure(N: int, H: int, V: int, weight_scale: float) -> dict:
    import torch

    from .action_logprobs import action_logprobs, action_logprobs_naive
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * weight_scale).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    for f in (action_logprobs, action_logprobs_naive):  # one-time init (thread pools, BLAS) off the books
        f(hidden[:4].detach(), weight.detach(), targets[:4])
    peaks = {}
    for name, f in (("fused", action_logprobs), ("naive", action_logprobs_naive)):
        hidden.grad = weight.grad = None
        _reset_high_water()
        before = _status("VmRSS:")
        f(hidden, weight, targets).sum().backward()
        peaks[name] = _status("VmHWM:") - before
    return peaks


def cpu_peaks(N: int, H: int, V: int, weight_scale: float = 0.2, timeout: float = 600) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-m", "vlarl_fast.kernels.memory_probe", str(N), str(H), str(V),
                          str(weight_scale)], capture_output=True, text=True, check=True, timeout=timeout,
                         env=env, cwd="/")  # not the checkout: -m imports from the cwd first
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    n, h, v = (int(x) for x in sys.argv[1:4])
    print(json.dumps(measure(n, h, v, float(sys.argv[4]))))
