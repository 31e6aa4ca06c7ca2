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


def normalize_advantages_grouped(adv: torch.Tensor, groups: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise within each group (e.g. each task) so that tasks with large rewards or long
    episodes do not drown the others' signal in a shared minibatch."""
    out = torch.empty_like(adv)
    for g in torch.unique(groups):
        sel = groups == g
        out[sel] = normalize_advantages(adv[sel], eps)
    return out


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor) -> float:
    var_y = torch.var(y_true)
    if var_y == 0:
        return float("nan")
    return float(1 - torch.var(y_true - y_pred) / var_y)
