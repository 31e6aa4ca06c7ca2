"""Log-probabilities (and entropy) of sampled action tokens under a vocabulary slice.

    action_logprobs(hidden [N,H], weight [V,H], targets [N]) ==
        log_softmax((hidden @ weight[vocab_start:vocab_end].T).float() / temperature)[targets - vocab_start]

Only the slice's logits are formed: for OpenVLA's constrained decoding the slice is the 256
action bins, so N x 256 x 4 bytes instead of N x 32064 x 4 bytes (N = 8192 action tokens:
8 MiB instead of 1 GiB). This module is the readable torch path; the chunked streaming
variant and the Triton kernel come with the kernels issue and are tested against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["action_logprobs"]


def action_logprobs(hidden, weight, targets, *, temperature: float = 1.0, vocab_start: int = 0,
                    vocab_end: int | None = None, return_entropy: bool = False, backend=None):
    if backend not in (None, "torch"):
        raise ValueError(f"action_logprobs: unknown backend {backend!r}; use None or 'torch'")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"action_logprobs: hidden must be [N, H] and weight [V, H]; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"action_logprobs: targets must be [N]={hidden.shape[0]}; got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError("action_logprobs: temperature must be > 0")
    V = weight.shape[0]
    vocab_end = V if vocab_end is None else vocab_end
    if not 0 <= vocab_start < vocab_end <= V:
        raise ValueError(f"action_logprobs: need 0 <= vocab_start < vocab_end <= V={V}; "
                         f"got [{vocab_start}, {vocab_end})")
    local = targets.long() - vocab_start
    if local.numel() and (local.min() < 0 or local.max() >= vocab_end - vocab_start):
        raise ValueError(f"action_logprobs: targets outside the vocab slice [{vocab_start}, {vocab_end})")
    logits = (hidden @ weight[vocab_start:vocab_end].T).float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, local[:, None]).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
