"""OpenVLA as a plain nn.Module: fused vision backbone -> 3-layer MLP projector -> Llama-2.

The module tree mirrors OpenVLA's ``OpenVLAForActionPrediction`` (``vision_backbone``, ``projector``,
``language_model``) so that its checkpoint maps on name by name (``names.py``); the forward is
OpenVLA's multimodal forward: the projected patch tokens go right after the first (BOS) column.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from .config import OpenVLAConfig
from .vision import FusedVisionBackbone


class FusedProjector(nn.Module):
    """vision_dim -> 4 * vision_dim -> llm_dim -> llm_dim, GELU between (OpenVLA's 'fused-gelu-mlp')."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.act_fn2 = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(patches)))))


def llama_config(config: OpenVLAConfig, attn_implementation: str | None = None) -> LlamaConfig:
    t = dict(config.text)
    t.pop("rope_scaling")
    cfg = LlamaConfig(**t)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return cfg


class OpenVLAModel(nn.Module):
    def __init__(self, config: OpenVLAConfig, attn_implementation: str | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.vision_backbone = FusedVisionBackbone(config.towers)
        self.projector = FusedProjector(self.vision_backbone.embed_dim, config.llm_dim)
        self.language_model = LlamaForCausalLM(llama_config(config, attn_implementation))

    # ---- pieces the policy uses ---------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.language_model.lm_head.weight

    @property
    def action_vocab_size(self) -> int:
        return self.config.action_vocab_size

    @property
    def vocab_start(self) -> int:
        """First action id; the action slice is ``[vocab_start, action_vocab_size)`` of the LM head."""
        return self.config.action_vocab_size - self.config.n_action_bins

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Preprocessed [B, 6, H, W] -> fused patch features [B, patches, vision_dim] (cacheable when frozen)."""
        return self.vision_backbone(pixel_values)

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def multimodal_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None):
        """OpenVLA's layout: [BOS, image patches, rest of the prompt]; returns (embeds, attention_mask)."""
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("give pixel_values or cached vision_features")
            vision_features = self.encode_images(pixel_values)
        if vision_features.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{vision_features.shape[0]} images for {input_ids.shape[0]} prompts: OpenVLA takes one "
                             "image per prompt")
        patches = self.project_images(vision_features)
        text = self.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(patches.shape[:2])
            attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        return embeds, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None, **lm_kwargs):
        """Logits over [BOS, patches, prompt] (OpenVLA's multimodal forward; prompts right-padded or unpadded)."""
        embeds, mask = self.multimodal_inputs(input_ids, attention_mask, pixel_values, vision_features)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, **lm_kwargs)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
