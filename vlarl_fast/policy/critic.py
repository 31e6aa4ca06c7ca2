"""The critic V(s) that PPO's advantages come from, in the two forms VLA-RL discusses.

- ``shared``: the value head reads the policy's own hidden states (one forward serves actor and critic;
  the built-in VLA detaches them, so value gradients never move the policy).
- ``separate``: VLA-RL's critic, a copy of the policy's language model initialised from it, with its own
  value head, trained only by the value loss. It costs a second prompt forward per step and a second copy
  of the language model's weights, and keeps the value loss from competing with the policy for the
  same features.

Either pools the prompt's hidden states from the last prompt column (the one that predicts the first
action token) or as the mean over the prompt's real (unpadded) tokens.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .lora import has_lora, merge_lora
from .protocol import make_value_head

CRITICS = ("shared", "separate")
POOLINGS = ("last", "mean")
CRITIC_CONFIG = "critic.json"
CRITIC_WEIGHTS = "critic.safetensors"


def pool_prompt(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Left-padded prompt hidden states [B, S, H] and mask [B, S] -> [B, H]."""
    if pooling == "last":
        return hidden[:, -1]
    if pooling == "mean":
        keep = mask.bool()[..., None]
        # masked_fill, not a product: a padding column's state may be NaN where its query saw no key
        total = hidden.masked_fill(~keep, 0).sum(1)
        return total / keep.sum(1).clamp(min=1).to(hidden.dtype)
    raise ValueError(f"unknown value pooling {pooling!r}; use one of {POOLINGS}")


class SeparateCritic(nn.Module):
    """A copy of the policy's decoder (the weights it has now) and a fresh, zero-output value head."""

    def __init__(self, decoder: nn.Module, hidden_size: int, value_hidden: int, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown value pooling {pooling!r}; use one of {POOLINGS}")
        self.decoder = copy.deepcopy(decoder)
        if has_lora(self):
            merge_lora(self)   # a plain copy of what the policy computes now; the critic trains every weight
        for p in self.decoder.parameters():
            p.requires_grad_(True)
        ref = next(self.decoder.parameters())
        self.value_head = make_value_head(hidden_size, value_hidden).to(ref.device)
        self.pooling = pooling
        self.value_hidden = value_hidden

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The policy's prompt embeddings (detached: the critic's loss stays out of the policy) -> values [B]."""
        h = self.decoder(inputs_embeds=embeds.detach(), attention_mask=mask, position_ids=pos,
                         use_cache=False).last_hidden_state
        pooled = pool_prompt(h, mask, self.pooling)
        return self.value_head(pooled.to(self.value_head[0].weight.dtype)).float().squeeze(-1)


def save_critic(path: Path, kind: str, pooling: str, critic: SeparateCritic | None) -> None:
    """critic.json (kind and pooling), and the separate critic's weights beside it."""
    cfg = {"critic": kind, "value_pooling": pooling}
    if critic is not None:
        cfg["value_hidden"] = critic.value_hidden
        state = {k: v.detach().contiguous().cpu() for k, v in critic.state_dict().items()}
        save_file(state, str(path / CRITIC_WEIGHTS))
    (path / CRITIC_CONFIG).write_text(json.dumps(cfg, indent=2))


def load_critic(path: Path, decoder: nn.Module, hidden_size: int) -> tuple[str, str, SeparateCritic | None]:
    """(kind, pooling, critic) as saved; a checkpoint without critic.json has the shared, last-token critic."""
    f = path / CRITIC_CONFIG
    if not f.exists():
        return "shared", "last", None
    cfg = json.loads(f.read_text())
    kind, pooling = cfg.get("critic", "shared"), cfg.get("value_pooling", "last")
    if kind not in CRITICS or pooling not in POOLINGS:
        raise ValueError(f"{f}: unknown critic {kind!r} or pooling {pooling!r} (critics: {CRITICS}; "
                         f"poolings: {POOLINGS})")
    if kind == "shared":
        return kind, pooling, None
    if not (path / CRITIC_WEIGHTS).exists():
        raise ValueError(f"{path} has a separate critic in {CRITIC_CONFIG} but no {CRITIC_WEIGHTS}")
    critic = SeparateCritic(decoder, hidden_size, int(cfg["value_hidden"]), pooling)
    critic.load_state_dict(load_file(str(path / CRITIC_WEIGHTS)))  # copies into each tensor's own dtype
    return kind, pooling, critic
