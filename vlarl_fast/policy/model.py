"""A small VLA built from transformers components: SigLIP vision tower -> pixel-shuffle MLP
projector -> Llama causal LM, with a proprio token and a value head.

Sequence layout (left padded for batching, so every prompt ends at the same column):

    [pad ...] <s> [image tokens] [proprio token] prompt text | a_0 ... a_6

The hidden state at the last prompt column predicts a_0 and feeds the value head; the hidden
state above a_k predicts a_{k+1}. Action tokens are the last 256 ids (``ActionTokenizer``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from .action_tokenizer import ACTION_DIM, N_BINS

# OpenVLA / SigLIP normalisation of [0, 1] pixels.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass
class VLAConfig:
    """Architecture of the tiny VLA; saved as config.json in the checkpoint directory."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    pixel_shuffle: int = 2  # merge shuffle x shuffle patches into one LM token
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    text_vocab_size: int = 384
    state_dim: int = 8
    use_state: bool = True
    value_hidden: int = 256
    value_detach: bool = True  # critic gradients stay out of the shared backbone
    max_positions: int = 256
    prompt_style: str = "instruction"  # "openvla": 'what action should the robot take to ...?'
    model_type: str = "vlarl-tiny-vla"

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + N_BINS

    @property
    def num_image_tokens(self) -> int:
        side = self.image_size // self.patch_size
        return (side // self.pixel_shuffle) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLAConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VLA config keys {sorted(unknown)}: is this a vlarl-fast tiny-VLA checkpoint?")
        return cls(**d)

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if (self.image_size // self.patch_size) % self.pixel_shuffle:
            raise ValueError("patches per side must be a multiple of pixel_shuffle")


class TinyVLA(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.vision = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=config.vision_hidden, intermediate_size=2 * config.vision_hidden,
            num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
            image_size=config.image_size, patch_size=config.patch_size))
        s = config.pixel_shuffle
        self.projector = nn.Sequential(
            nn.Linear(config.vision_hidden * s * s, config.hidden_size), nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size))
        self.lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
            max_position_embeddings=config.max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False))
        self.state_proj = nn.Sequential(nn.Linear(config.state_dim, config.hidden_size), nn.GELU(),
                                        nn.Linear(config.hidden_size, config.hidden_size))
        self.value_head = nn.Sequential(nn.Linear(config.hidden_size, config.value_hidden), nn.Tanh(),
                                        nn.Linear(config.value_hidden, 1))
        nn.init.zeros_(self.value_head[-1].weight)
        nn.init.zeros_(self.value_head[-1].bias)
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    # ---- pieces -------------------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm.lm_head.weight

    @property
    def vocab_start(self) -> int:
        return self.config.vocab_size - N_BINS

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> vision features [B, tokens, vision_hidden * s^2] (before projector).

        Kept separate so a frozen vision tower's features can be cached in the rollout buffer."""
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [B, H, W, 3]; got {tuple(images.shape)}")
        size = self.config.image_size
        if images.shape[1] != size or images.shape[2] != size:
            raise ValueError(f"this policy expects {size}x{size} images, got {images.shape[1]}x{images.shape[2]}: "
                             f"make the env with image_size={size}")
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.image_mean) / self.image_std
        feats = self.vision(pixel_values=x).last_hidden_state  # [B, P*P, C]
        B, n, C = feats.shape
        side, s = int(n ** 0.5), self.config.pixel_shuffle
        feats = feats.view(B, side // s, s, side // s, s, C).permute(0, 1, 3, 2, 4, 5)
        return feats.reshape(B, (side // s) ** 2, s * s * C)

    def prompt_embeds(self, vision_feats, states, text_ids, text_mask):
        """Build left-padded prompt embeddings.

        text_ids/text_mask: [B, L] left padded (prompt text only, no BOS).
        Returns (embeds [B, S, D], attention_mask [B, S], position_ids [B, S])."""
        B = vision_feats.shape[0]
        emb = self.lm.model.embed_tokens
        img = self.projector(vision_feats)
        parts = [emb(torch.full((B, 1), 1, dtype=torch.long, device=img.device)), img]
        if self.config.use_state:
            if states is None or states.shape != (B, self.config.state_dim):
                raise ValueError(f"states must be [B, {self.config.state_dim}]")
            parts.append(self.state_proj(states.float())[:, None])
        prefix = torch.cat(parts, 1)
        text = emb(text_ids)
        n_pad = (text_mask == 0).sum(1)
        # Move the padding in front of <s> so every row is [pad..., <s>, image, state, text].
        L = text_ids.shape[1]
        seq = torch.cat([prefix, text], 1)
        S = seq.shape[1]
        idx = torch.arange(S, device=seq.device)[None].expand(B, S)
        P = prefix.shape[1]
        # source column for output column j: pads first, then prefix, then real text tokens
        src = torch.where(idx < n_pad[:, None], P + idx,                     # pad tokens (embeds unused)
                          torch.where(idx < n_pad[:, None] + P, idx - n_pad[:, None], idx))
        seq = seq.gather(1, src[..., None].expand(B, S, seq.shape[-1]))
        mask = (idx >= n_pad[:, None]).long()
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        del L
        return seq, mask, pos

    def value_from_hidden(self, h_last: torch.Tensor) -> torch.Tensor:
        if self.config.value_detach:
            h_last = h_last.detach()
        return self.value_head(h_last.float()).squeeze(-1)

    # ---- teacher-forced forward (SFT and the PPO update) ---------------------------------
    def forward_actions(self, vision_feats, states, text_ids, text_mask, action_tokens):
        """Hidden states that predict each of the 7 action tokens, and the value.

        Returns (hidden [B, 7, D], values [B])."""
        embeds, mask, pos = self.prompt_embeds(vision_feats, states, text_ids, text_mask)
        B, S, _ = embeds.shape
        act_in = self.lm.model.embed_tokens(action_tokens[:, : ACTION_DIM - 1])
        embeds = torch.cat([embeds, act_in], 1)
        mask = torch.cat([mask, torch.ones(B, ACTION_DIM - 1, dtype=mask.dtype, device=mask.device)], 1)
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, ACTION_DIM, device=pos.device)[None]], 1)
        out = self.lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
        h = out.last_hidden_state[:, S - 1:]
        return h, self.value_from_hidden(h[:, 0])


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
