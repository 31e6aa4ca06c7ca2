"""Triton GAE kernel behind ``gae(..., backend="triton")`` (CUDA tensors by default).

One program per block of BLOCK_N columns walks t = T-1 .. 0, keeping the running advantage in
registers; each step loads the five inputs of its columns and stores A and A + V. Time-major
[T, N] storage makes a step's column block contiguous, so every load is coalesced.

Memory arithmetic: 5 loads + 2 stores of 4 B per element, T x N x 28 B in all (T=512, N=64:
0.9 MB, T=128, N=1024: 3.7 MB); the running state is BLOCK_N floats per program. No chunking is
needed. BLOCK_N = 128 (4 warps x 32 lanes) keeps N=1024 at 8 programs, N=64 at one: the scan is
latency-bound over T either way, and a smaller block would only spread the same serial chain over
more SMs.
"""
from __future__ import annotations

import os

import torch

from . import _device

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - triton is a dependency on linux x86_64
    raise ImportError("gae(backend='triton') needs the `triton` package; use backend='torch'") from e


# triton.jit decides at decoration time whether a kernel is compiled or interpreted, so the
# module's mode is fixed by TRITON_INTERPRET as it was when this module was first imported.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether this module's kernels run in Triton's interpreter (CPU tensors) rather than compiled."""
    return _INTERPRETED


@triton.jit
def _gae_kernel(r_ptr, v_ptr, nv_ptr, term_ptr, end_ptr, adv_ptr, ret_ptr,
                T, N, gamma, gamma_lam, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    cols64 = cols.to(tl.int64)
    last = tl.zeros([BLOCK_N], tl.float32)
    for i in range(0, T):
        off = (T - 1 - i).to(tl.int64) * N + cols64
        r = tl.load(r_ptr + off, mask=mask, other=0.0)
        v = tl.load(v_ptr + off, mask=mask, other=0.0)
        nv = tl.load(nv_ptr + off, mask=mask, other=0.0)
        term = tl.load(term_ptr + off, mask=mask, other=0.0)
        end = tl.load(end_ptr + off, mask=mask, other=0.0)
        delta = r + gamma * (1.0 - term) * nv - v
        last = delta + gamma_lam * (1.0 - end) * last
        tl.store(adv_ptr + off, last, mask=mask)
        tl.store(ret_ptr + off, last + v, mask=mask)


BLOCK_N = 128


def gae(rewards, values, next_values, terminated, episode_end, gamma: float, lam: float):
    T, N = rewards.shape
    ins = [x.float().contiguous() for x in (rewards, values, next_values, terminated, episode_end)]
    adv = torch.empty(T, N, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if T and N:
        block = 16 if interpreting() else BLOCK_N
        with _device.launch_on(adv):
            _gae_kernel[(triton.cdiv(N, block),)](*ins, adv, ret, T, N, gamma, gamma * lam, BLOCK_N=block)
    return adv, ret
