"""The reference policy of the KL penalty (``--ppo.kl-coef``): the policy as RL found it.

With LoRA the reference is the same model with its adapters switched off, so it costs no second copy of the
weights; otherwise it is a frozen copy taken when RL starts (for a 7B backbone trained without LoRA that is a
second copy of the weights in memory: train with LoRA, or leave --ppo.kl-coef at 0).
"""
from __future__ import annotations

import contextlib
import copy

import torch

from ..policy.lora import adapters_disabled, has_lora


class ReferencePolicy:
    def __init__(self, policy):
        self.policy = policy
        self.frozen = None
        if not has_lora(policy.model):
            self.frozen = copy.deepcopy(policy.model).eval()
            for p in self.frozen.parameters():
                p.requires_grad_(False)

    @contextlib.contextmanager
    def active(self):
        """Inside the block the policy computes with the reference weights."""
        if self.frozen is None:
            with adapters_disabled(self.policy.model):
                yield
            return
        model, self.policy.model = self.policy.model, self.frozen
        try:
            yield
        finally:
            self.policy.model = model


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token, from samples of the policy:
    exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased)."""
    d = ref_logp - logp
    return d.exp() - d - 1
