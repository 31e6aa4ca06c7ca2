"""The clipped PPO objective over actions made of several tokens.

One ratio per action: the action's log-prob is the sum of its 7 token log-probs, so the
ratio is exp(sum new - sum old). The clip range may be asymmetric (``clip_low`` below 1,
``clip_high`` above), as in DAPO-style "clip-higher", which keeps low-probability actions
that turned out well from being clipped too early.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PPOStats:
    pg_loss: float
    v_loss: float
    entropy: float
    approx_kl: float
    clipfrac: float


def ppo_losses(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
               new_values: torch.Tensor, returns: torch.Tensor, *, clip_low: float = 0.2,
               clip_high: float = 0.2):
    """new_logp/old_logp: [B] action log-probs (token sums). Returns (pg_loss, v_loss, approx_kl, clipfrac)."""
    logratio = new_logp - old_logp
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    v_loss = 0.5 * ((new_values - returns) ** 2).mean()
    with torch.no_grad():
        # Schulman's low-variance estimator of KL(old || new)
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)).float().mean()
    return pg_loss, v_loss, approx_kl, clipfrac


def normalize_advantages(adv: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    if adv.numel() < 2:
        return adv
    return (adv - adv.mean()) / (adv.std() + eps)


def normalize_advantages_grouped(adv: torch.Tensor, groups: torch.Tensor, eps: float = 1e-8,
                                 reduce_sum=None, num_groups: int | None = None) -> torch.Tensor:
    """Normalise within each group (e.g. each task) so that tasks with large rewards or long
    episodes do not drown the others' signal in a shared minibatch. ``reduce_sum`` (with ``num_groups``, groups
    numbered below it): each group's count, sum and sum of squares are summed by it over the ranks of a
    data-parallel run first, so every rank normalises with the statistics of the whole batch."""
    if reduce_sum is not None:
        return _normalize_grouped_reduced(adv, groups, eps, reduce_sum, num_groups)
    out = torch.empty_like(adv)
    for g in torch.unique(groups):
        sel = groups == g
        out[sel] = normalize_advantages(adv[sel], eps)
    return out


def _normalize_grouped_reduced(adv, groups, eps, reduce_sum, num_groups: int) -> torch.Tensor:
    x = adv.double()
    n = torch.bincount(groups, minlength=num_groups).double()
    total = torch.zeros(num_groups, dtype=torch.float64, device=adv.device).index_add_(0, groups, x)
    squares = torch.zeros_like(total).index_add_(0, groups, x * x)
    n, total, squares = torch.as_tensor(reduce_sum(torch.cat([n, total, squares]).cpu().numpy()),
                                         device=adv.device).split(num_groups)
    mean = total / n.clamp(min=1)
    std = ((squares - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)).sqrt()   # unbiased, as torch.std
    # a group of one (over every rank) stays as it is, as normalize_advantages leaves it
    out = torch.where(n[groups] >= 2, (x - mean[groups]) / (std[groups] + eps), x)
    return out.to(adv.dtype)


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor) -> float:
    var_y = torch.var(y_true)
    if var_y == 0:
        return float("nan")
    return float(1 - torch.var(y_true - y_pred) / var_y)
