"""Generalised advantage estimation over time-major [T, N] rollouts.

The recurrence (DESIGN.md §4) is

    delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
    A_t     = delta_t + gamma * lam * (1 - episode_end_t) * A_{t+1}
    returns = A + values

``next_values`` carries V(s_{t+1}); at a time-limit truncation it holds the value of the
final observation, so a truncated episode is bootstrapped instead of being scored as a failure.
``episode_end`` (terminated or truncated) stops the advantage from leaking across an auto-reset.

``gae_reference`` is the readable loop every fast path is tested against. ``gae`` runs the
reverse scan vectorised over the N columns: one Python iteration per time step, never per
element. The Triton kernel for CUDA tensors lands with the kernels issue; until then CUDA
tensors take the same vectorised path.
"""
from __future__ import annotations

import torch

__all__ = ["gae", "gae_reference"]


def _check(rewards, values, next_values, terminated, episode_end):
    shape = rewards.shape
    if rewards.dim() != 2:
        raise ValueError(f"gae expects time-major [T, N] tensors; rewards has shape {tuple(shape)}")
    for name, t in (("values", values), ("next_values", next_values),
                    ("terminated", terminated), ("episode_end", episode_end)):
        if t.shape != shape:
            raise ValueError(f"gae: {name} has shape {tuple(t.shape)} but rewards has {tuple(shape)}; "
                             "all inputs must be [T, N]")
    for name, t in (("rewards", rewards), ("values", values), ("next_values", next_values)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"gae: {name} contains NaN or inf")


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


def gae(rewards, values, next_values, terminated, episode_end, gamma: float, lam: float, backend=None):
    """Vectorised GAE; returns (advantages, returns) as float32 [T, N]."""
    _check(rewards, values, next_values, terminated, episode_end)
    if backend not in (None, "torch"):
        raise ValueError(f"gae: unknown backend {backend!r}; use None or 'torch'")
    r = rewards.float()
    v = values.float()
    nonterminal = 1.0 - terminated.float()
    notend = 1.0 - episode_end.float()
    delta = r + gamma * nonterminal * next_values.float() - v
    decay = gamma * lam * notend
    advantages = torch.empty_like(delta)
    lastgaelam = torch.zeros_like(delta[0])
    for t in range(r.shape[0] - 1, -1, -1):
        lastgaelam = delta[t] + decay[t] * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + v
