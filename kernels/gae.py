"""Generalised advantage estimation over time-major [T, N] rollouts.

The recurrence (the public contract) is

    delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
    A_t     = delta_t + gamma * lam * (1 - episode_end_t) * A_{t+1}          (A_T = 0)
    returns = A + values

``next_values`` carries V(s_{t+1}); at a time-limit truncation it holds the value of the
final observation, so a truncated episode is bootstrapped instead of being scored as a failure.
``episode_end`` (terminated or truncated) stops the advantage from leaking across an auto-reset.

Four implementations of one recurrence:

- ``gae_reference``: the readable double loop (CleanRL's ``lastgaelam``), in Python floats. The
  definition every other path is tested against.
- ``gae_stepwise``: vectorised over the N columns, one Python iteration per time step (two torch
  ops per step). What a user would otherwise write; kept as the benchmarks' vectorised baseline.
- the CPU path of ``gae`` (``backend="torch"``): a two-level parallel scan, no loop over T.
  ``A_t = delta_t + c_t A_{t+1}`` composes affine maps, which is associative, so a reverse
  Hillis-Steele scan computes it in log2 steps of whole-tensor ops:
  ``(b_t, a_t) <- (b_t + a_t b_{t+s}, a_t a_{t+s})`` for s = 1, 2, 4, ...; afterwards b_t = A_t.
  Over the full horizon that is O(T log T) work, so T is cut into blocks of ``_BLOCK`` = 16 steps:
  one scan runs inside every block at once (4 steps over [16, T/16, N]), a second scan over the
  T/16 block starts carries A into each block, and one fused multiply-add adds
  ``(prod of c to the block end) * A_{next block start}``. About 40 tensor ops for any T up to
  ~4000 instead of 2T; measured on 2 shared CPU cores at T=512, N=64: 0.50 ms against 4.5 ms for
  ``gae_stepwise`` and 428 ms for the Python loop (x857; benchmarks/RESULTS.md). The scan only reassociates
  the same multiply-adds: products of decays underflow harmlessly to 0, there is no division
  and no cancellation, and the result matches the loop to float32 rounding (tests: 1e-5).
  (A closed form through cumulative products of gamma*lam would need (gamma*lam)^-t, which
  overflows or loses everything to cancellation past a few hundred steps; numba or a C++
  function would add a dependency or a build step for no measurable gain at these sizes.)
- the CUDA path (``backend="triton"``): ``_gae_kernel``, one program per block of columns,
  each walking T backwards with the running advantage in registers; time-major layout makes
  every step's load of a column block contiguous.

Memory: every path reads 5 x T x N and writes 2 x T x N float32 values (T=512, N=64: 128 KiB
in, 256 KiB out); the scan's temporaries are 3 more [T, N] buffers. Nothing here needs chunking.
"""
from __future__ import annotations

import torch

from ._device import check_one_device
from ._errors import NonFiniteError

__all__ = ["gae", "gae_reference", "gae_stepwise"]

_BLOCK = 16


def _check(rewards, values, next_values, terminated, episode_end):
    shape = rewards.shape
    if rewards.dim() != 2:
        raise ValueError(f"gae expects time-major [T, N] tensors; rewards has shape {tuple(shape)} "
                         "(stack per-step vectors along dim 0; a single env is [T, 1])")
    for name, t in (("values", values), ("next_values", next_values),
                    ("terminated", terminated), ("episode_end", episode_end)):
        if t.shape != shape:
            raise ValueError(f"gae: {name} has shape {tuple(t.shape)} but rewards has {tuple(shape)}; "
                             "all inputs must be [T, N]")
    check_one_device("gae", rewards=rewards, values=values, next_values=next_values, terminated=terminated,
                     episode_end=episode_end)
    for name, t in (("rewards", rewards), ("values", values), ("next_values", next_values)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"gae: {name} contains NaN or inf; find where it enters the rollout (a diverged "
                             "critic or an env reward) before computing advantages")


def gae_reference(rewards, values, next_values, terminated, episode_end, gamma: float, lam: float):
    """Readable double loop; the definition the fast paths must match."""
    _check(rewards, values, next_values, terminated, episode_end)
    T, N = rewards.shape
    advantages = torch.zeros(T, N, dtype=torch.float32)
    for n in range(N):
        lastgaelam = 0.0
        for t in reversed(range(T)):
            nonterminal = 1.0 - float(terminated[t, n])
            notend = 1.0 - float(episode_end[t, n])
            delta = float(rewards[t, n]) + gamma * nonterminal * float(next_values[t, n]) - float(values[t, n])
            lastgaelam = delta + gamma * lam * notend * lastgaelam
            advantages[t, n] = lastgaelam
    advantages = advantages.to(values.device)
    return advantages, advantages + values.float()


def _delta_decay(rewards, values, next_values, terminated, episode_end, gamma, lam):
    v = values.float()
    delta = rewards.float() + gamma * (1.0 - terminated.float()) * next_values.float() - v
    decay = (gamma * lam) * (1.0 - episode_end.float())
    return delta, decay, v


def gae_stepwise(rewards, values, next_values, terminated, episode_end, gamma: float, lam: float):
    """Vectorised over N, one Python step per time step: the vectorised baseline."""
    _check(rewards, values, next_values, terminated, episode_end)
    delta, decay, v = _delta_decay(rewards, values, next_values, terminated, episode_end, gamma, lam)
    advantages = torch.empty_like(delta)
    lastgaelam = torch.zeros_like(delta[0])
    for t in range(delta.shape[0] - 1, -1, -1):
        lastgaelam = delta[t] + decay[t] * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + v


def _suffix_scan(b, a):
    """In place over dim 0: b_t <- x_t where x_t = b_t + a_t x_{t+1} (x past the end = 0), and
    a_t <- prod_{k >= t} a_k. Hillis-Steele: after the step with offset s, (b_t, a_t) summarise
    the 2s steps t .. t+2s-1."""
    T = b.shape[0]
    s = 1
    while s < T:
        # right-hand sides are evaluated into new tensors before the slice assignment,
        # so every read sees the previous step's values
        b[:-s] = torch.addcmul(b[:-s], a[:-s], b[s:])
        a[:-s] = a[:-s] * a[s:]
        s *= 2
    return b, a


def _gae_scan(delta, decay):
    T, N = delta.shape
    nb = -(-T // _BLOCK)
    pad = nb * _BLOCK - T
    if pad:  # padded steps have delta = 0 and decay = 0: A there is 0, as past the horizon
        z = delta.new_zeros(pad, N)
        delta, decay = torch.cat([delta, z]), torch.cat([decay, z])
    # (the scan overwrites delta and decay: both are fresh tensors from _delta_decay or cat)
    # [B, nb, N]: dim 0 walks time inside a block, all blocks scanned at once
    b = delta.view(nb, _BLOCK, N).transpose(0, 1)
    a = decay.view(nb, _BLOCK, N).transpose(0, 1)
    _suffix_scan(b, a)
    # A at each block's first step, given A_{next block start}: the same recurrence over blocks
    starts, _ = _suffix_scan(b[0].clone(), a[0].clone())
    carry = torch.cat([starts[1:], starts.new_zeros(1, N)])
    adv = torch.addcmul(b, a, carry[None])
    return adv.transpose(0, 1).reshape(nb * _BLOCK, N)[:T]


def gae(rewards, values, next_values, terminated, episode_end, gamma: float, lam: float, backend=None):
    """GAE; returns (advantages, returns) as float32 [T, N] on the inputs' device.

    ``backend``: None picks the Triton kernel for CUDA tensors and the parallel scan otherwise;
    "torch" / "triton" force one (Triton on CPU tensors needs ``TRITON_INTERPRET=1``). The Triton kernel
    runs on the inputs' device, whichever CUDA device is current."""
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"gae: unknown backend {backend!r}; use None (pick by device), 'torch' or 'triton'")
    _check(rewards, values, next_values, terminated, episode_end)
    if backend is None:
        backend = "triton" if rewards.is_cuda and _triton_available() else "torch"
    if backend == "triton":
        from . import _triton_gae
        if not rewards.is_cuda and not _triton_gae.interpreting():
            raise ValueError("gae: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
                             "is imported; use backend='torch' (or None) for CPU tensors")
        return _triton_gae.gae(rewards, values, next_values, terminated, episode_end, float(gamma), float(lam))
    if rewards.numel() == 0:
        z = torch.zeros(rewards.shape, dtype=torch.float32, device=rewards.device)
        return z, z + values.float()
    delta, decay, v = _delta_decay(rewards, values, next_values, terminated, episode_end, gamma, lam)
    advantages = _gae_scan(delta, decay)
    return advantages, advantages + v


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
