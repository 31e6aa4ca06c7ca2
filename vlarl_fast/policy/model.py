"""A small VLA built from transformers components: a ResNet vision tower -> projector ->
Llama causal LM, with a proprio token and a value head.

The projector makes two kinds of image tokens: pixel-shuffled feature-map cells (what is
where, coarsely) and one keypoint token, the spatial-softmax expected (x, y) of every feature
channel (Levine et al., 2016), which carries object positions at sub-cell precision. A tiny
model trained from scratch learns to localise objects from keypoints far faster than from
patch tokens alone.

Sequence layout (left padded for batching, so every prompt ends at the same column):

    [pad ...] <s> [image tokens] [proprio token] prompt text | a_0 ... a_6

The hidden state at the last prompt column predicts a_0 and feeds the value head; the hidden
state above a_k predicts a_{k+1}. Action tokens are the last 256 ids (``ActionTokenizer``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, ResNetConfig, ResNetModel

from .action_tokenizer import N_BINS
from .protocol import make_value_head
from .text_tokenizer import prompt_text

# ImageNet normalisation of [0, 1] pixels (what ResNet towers expect).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
VISION_STRIDE = 8   # the ResNet stem (/4) and its second stage (/2)


@dataclass
class VLAConfig:
    """Architecture of the tiny VLA; saved as config.json in the checkpoint directory."""

    image_size: int = 64
    vision_channels: tuple[int, int] = (32, 64)  # ResNet stage widths
    pixel_shuffle: int = 2  # merge shuffle x shuffle feature cells into one LM token
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
    def feature_side(self) -> int:
        return self.image_size // VISION_STRIDE

    @property
    def feature_dim(self) -> int:
        """Width of one cached vision-feature row (a shuffled cell; the keypoint row is padded to it)."""
        return max(self.vision_channels[1] * self.pixel_shuffle ** 2, 2 * sum(self.vision_channels))

    @property
    def num_image_tokens(self) -> int:
        return (self.feature_side // self.pixel_shuffle) ** 2 + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLAConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VLA config keys {sorted(unknown)}: is this a vlarl-fast tiny-VLA checkpoint?")
        d = dict(d)
        if "vision_channels" in d:
            d["vision_channels"] = tuple(d["vision_channels"])
        return cls(**d)

    def validate(self) -> None:
        if self.image_size % (VISION_STRIDE * self.pixel_shuffle):
            raise ValueError(f"image_size {self.image_size} must be a multiple of {VISION_STRIDE * self.pixel_shuffle}")


class TinyVLA(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        config.validate()
        self.config = config
        c1, c2 = config.vision_channels
        self.vision = ResNetModel(ResNetConfig(
            num_channels=3, embedding_size=c1, hidden_sizes=[c1, c2], depths=[1, 1], layer_type="basic",
            downsample_in_first_stage=False))
        s = config.pixel_shuffle
        self.keypoint_temperature = nn.Parameter(torch.ones(c1 + c2))
        self.projector = nn.Sequential(
            nn.Linear(c2 * s * s, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size))
        self.keypoint_proj = nn.Sequential(
            nn.Linear(2 * (c1 + c2), config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size))
        n_cells = (config.feature_side // s) ** 2
        self.cell_pos = nn.Parameter(torch.zeros(n_cells, config.hidden_size))
        self.lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
            max_position_embeddings=config.max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False))
        self.state_proj = nn.Sequential(nn.Linear(config.state_dim, config.hidden_size), nn.GELU(),
                                        nn.Linear(config.hidden_size, config.hidden_size))
        self.value_head = make_value_head(config.hidden_size, config.value_hidden)
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    # ---- the VLA model API (protocol.VLAModel) ------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.lm.model

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm.lm_head.weight

    @property
    def vision_tower(self) -> nn.Module:
        return self.vision

    @property
    def vocab_start(self) -> int:
        return self.config.vocab_size - N_BINS

    @property
    def vocab_end(self) -> int:
        return self.config.vocab_size

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model.embed_tokens(ids)

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """The tower normalises uint8 pixels itself (``encode_images``), so rollout buffers store raw images."""
        return images

    def prompt_ids(self, tokenizer, instruction: str) -> list[int]:
        """The prompt text only: <s>, image and proprio tokens are embedded in front by ``prompt_embeds``."""
        return tokenizer(prompt_text(instruction, self.config.prompt_style), add_special_tokens=False)["input_ids"]

    @staticmethod
    def _spatial_softmax(fmap: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> expected (x, y) in [-1, 1] per channel: [B, 2C]."""
        B, C, H, W = fmap.shape
        attn = F.softmax(fmap.flatten(2) / temperature.view(1, C, 1).clamp(min=1e-2), -1).view(B, C, H, W)
        xs = torch.linspace(-1, 1, W, device=fmap.device, dtype=attn.dtype)
        ys = torch.linspace(-1, 1, H, device=fmap.device, dtype=attn.dtype)
        ex = (attn.sum(2) * xs).sum(-1)
        ey = (attn.sum(3) * ys).sum(-1)
        return torch.cat([ex, ey], -1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> vision features [B, num_image_tokens, feature_dim] (before the projector).

        Kept separate so a frozen vision tower's features can be cached in the rollout buffer."""
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [B, H, W, 3]; got {tuple(images.shape)}")
        size = self.config.image_size
        if images.shape[1] != size or images.shape[2] != size:
            raise ValueError(f"this policy expects {size}x{size} images, got {images.shape[1]}x{images.shape[2]}: "
                             f"make the env with image_size={size}")
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.image_mean) / self.image_std
        out = self.vision(pixel_values=x, output_hidden_states=True)
        fine, fmap = out.hidden_states[-2], out.last_hidden_state  # [B, c1, 2S, 2S], [B, c2, S, S]
        c1 = fine.shape[1]
        kp = torch.cat([self._spatial_softmax(fine, self.keypoint_temperature[:c1]),
                        self._spatial_softmax(fmap, self.keypoint_temperature[c1:])], -1)
        B, C, S, _ = fmap.shape
        s = self.config.pixel_shuffle
        cells = fmap.view(B, C, S // s, s, S // s, s).permute(0, 2, 4, 3, 5, 1).reshape(B, (S // s) ** 2, s * s * C)
        D = self.config.feature_dim
        cells = F.pad(cells, (0, D - cells.shape[-1]))
        return torch.cat([cells, F.pad(kp, (0, D - kp.shape[-1]))[:, None]], 1)

    def project_images(self, feats: torch.Tensor) -> torch.Tensor:
        """Cached vision features -> LM image tokens [B, num_image_tokens, hidden]."""
        c1, c2 = self.config.vision_channels
        s = self.config.pixel_shuffle
        cells = self.projector(feats[:, :-1, : c2 * s * s]) + self.cell_pos
        kp = self.keypoint_proj(feats[:, -1, : 2 * (c1 + c2)])
        return torch.cat([cells, kp[:, None]], 1)

    def prompt_embeds(self, vision_feats, states, text_ids, text_mask):
        """Build left-padded prompt embeddings.

        text_ids/text_mask: [B, L] left padded (prompt text only, no BOS).
        Returns (embeds [B, S, D], attention_mask [B, S], position_ids [B, S])."""
        B = vision_feats.shape[0]
        emb = self.lm.model.embed_tokens
        img = self.project_images(vision_feats)
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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
