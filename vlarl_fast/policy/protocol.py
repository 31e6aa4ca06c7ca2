"""The small model API that ``VLAPolicy`` drives, so one rollout/training path serves every VLA.

A model is an image encoder, a way to lay out a prompt around the image, a causal decoder and an
LM head whose ids ``[vocab_start, vocab_end)`` are the 256 action bins. Everything model-specific
(OpenVLA puts the patches after BOS and has no proprio token; the tiny VLA adds a proprio token and
keypoint tokens) stays behind these members; decoding, log-probs and the value read only them.

Sequence contract: ``prompt_embeds`` returns left-padded rows, so every prompt ends at the same
column; the hidden state there predicts the first action token and feeds the value head.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class VLAModel(Protocol):
    vocab_start: int   # first action id
    vocab_end: int     # one past the last action id (OpenVLA: 32000, not the padded 32064)

    @property
    def decoder(self) -> nn.Module:
        """The causal LM without its head (a transformers ``*Model``): takes ``inputs_embeds``,
        ``attention_mask`` [B, S], ``position_ids``, its KV cache (``cache``, or ``past_key_values`` before
        transformers 5.25), ``use_cache`` and returns ``last_hidden_state``."""

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]; only rows ``[vocab_start, vocab_end)`` are ever multiplied."""

    @property
    def vision_tower(self) -> nn.Module:
        """The image encoder behind ``encode_images`` (frozen, and its features cached, when RL keeps it fixed)."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Model image input -> vision features [B, tokens, C] (cacheable while the tower is frozen)."""

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] on the model's device -> what ``encode_images`` takes; checks size and dtype."""

    def prompt_ids(self, tokenizer, instruction: str) -> list[int]:
        """Token ids of one prompt in this model's wording (``prompt_embeds`` adds the image)."""

    def prompt_embeds(self, vision_feats: torch.Tensor, states: torch.Tensor | None, prompt_ids: torch.Tensor,
                      prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ``prompt_ids``/``prompt_mask`` [B, L] -> (embeds [B, S, H], attention_mask [B, S],
        position_ids [B, S]), still left padded, image (and proprio, if used) in place."""

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids (the action tokens fed back while decoding)."""

    def value_from_hidden(self, h_last: torch.Tensor) -> torch.Tensor:
        """Hidden state of the last prompt column [B, H] -> value [B] (float32)."""


MEMBERS = ("vocab_start", "vocab_end", "decoder", "lm_head_weight", "vision_tower", "encode_images", "preprocess_images",
           "prompt_ids", "prompt_embeds", "embed_tokens", "value_from_hidden")


def check_model(model) -> None:
    """Fail at construction, naming what is missing, rather than deep inside a rollout."""
    missing = [m for m in MEMBERS if not hasattr(type(model), m) and not hasattr(model, m)]
    if missing:
        raise TypeError(f"{type(model).__name__} does not implement the VLA model API "
                        f"(vlarl_fast.policy.protocol.VLAModel): missing {', '.join(missing)}")
    if not 0 <= model.vocab_start < model.vocab_end <= model.lm_head_weight.shape[0]:
        raise ValueError(f"{type(model).__name__}: action ids [{model.vocab_start}, {model.vocab_end}) do not fit "
                         f"its LM head of {model.lm_head_weight.shape[0]} rows")


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> left-padded ids and mask [B, L]: every prompt then ends at the last column."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, L - len(r):] = 1
    return ids, mask


def insert_after_bos(text: torch.Tensor, text_mask: torch.Tensor, patches: torch.Tensor):
    """OpenVLA's layout for left-padded rows: [pad..., BOS, prompt...] text embeddings [B, L, H] and image
    tokens [B, P, H] -> [pad..., BOS, patches, prompt...] embeddings, attention mask and positions."""
    B, L, _ = text.shape
    P = patches.shape[1]
    seq = torch.cat([text, patches.to(text.dtype)], 1)  # text columns 0..L-1, patches L..L+P-1
    n_pad = (text_mask == 0).sum(1, keepdim=True)
    idx = torch.arange(L + P, device=text.device)[None].expand(B, L + P)
    # output column j: pads and BOS keep their text column, then the patches, then the prompt moved right by P
    src = torch.where(idx <= n_pad, idx, torch.where(idx <= n_pad + P, L + idx - n_pad - 1, idx - P))
    seq = seq.gather(1, src[..., None].expand(B, L + P, seq.shape[-1]))
    mask = (idx >= n_pad).to(text_mask.dtype)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return seq, mask, pos


def make_value_head(hidden_size: int, value_hidden: int) -> nn.Sequential:
    """hidden -> tanh MLP -> 1. The last layer starts at zero: the critic predicts 0 for every state
    until trained, so the first advantages are the plain returns rather than noise from a random head."""
    head = nn.Sequential(nn.Linear(hidden_size, value_hidden), nn.Tanh(), nn.Linear(value_hidden, 1))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing in the language model (transformers' own, non-reentrant)."""
    dec = model.decoder
    kwargs = {"use_reentrant": False}
    if hasattr(dec, "activation_checkpointing_enable"):   # transformers >= 5.x's name
        dec.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(dec, "gradient_checkpointing_enable"):
        dec.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(dec).__name__} has no gradient checkpointing (transformers *Model decoders have it)")


def update_mode(module: nn.Module) -> None:
    """The mode of a PPO update: eval everywhere (no dropout, batch norm on its running statistics), so
    the update scores exactly the policy the rollout sampled and the first ratio is 1; only the flag that
    gradient checkpointing reads (``module.training`` of a module with ``gradient_checkpointing`` on)
    is set, on that module alone, since transformers checkpoints only in training mode."""
    module.eval()
    for m in module.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
