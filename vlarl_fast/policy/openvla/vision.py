"""OpenVLA's fused vision backbone from transformers' own ViTs (no timm).

OpenVLA runs timm's DINOv2 (ViT-L/14, 4 registers) and SigLIP (So400M/14) towers and keeps, from each,
the patch tokens after the second-to-last block, without the final norm (timm's
``get_intermediate_layers(n={depth - 2})``), then concatenates the two along channels:
[B, 256, 1024 + 1152] at 224 px. ``Dinov2WithRegistersModel`` and ``SiglipVisionModel`` compute the same
blocks; the last block, final norms and SigLIP's attention-pooling head are kept only so that every
checkpoint tensor has a home (``names.py``), and are never run.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, SiglipVisionModel

from .config import ViTSpec


def build_tower(spec: ViTSpec) -> nn.Module:
    if spec.kind == "dinov2":
        if spec.mlp_dim % spec.hidden_size:
            raise ValueError(f"DINOv2 tower: mlp_dim {spec.mlp_dim} must be a multiple of width {spec.hidden_size}")
        cfg = Dinov2WithRegistersConfig(
            hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            mlp_ratio=spec.mlp_dim // spec.hidden_size, patch_size=spec.patch_size, image_size=spec.image_size,
            num_register_tokens=spec.num_register_tokens, hidden_act=spec.hidden_act, layer_norm_eps=1e-6,
            qkv_bias=True, layerscale_value=1e-5)
        return Dinov2WithRegistersModel(cfg)
    cfg = SiglipVisionConfig(
        hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        intermediate_size=spec.mlp_dim, patch_size=spec.patch_size, image_size=spec.image_size,
        hidden_act=spec.hidden_act, layer_norm_eps=1e-6, vision_use_head=True)
    model = SiglipVisionModel(cfg)
    # older transformers releases nest the tower in ``vision_model``; that inner module has the later releases'
    # layout (embeddings, encoder, post_layernorm, head), so the tensor names are the same on every release
    return getattr(model, "vision_model", model)


def _prefix_tokens(spec: ViTSpec) -> int:
    return 1 + spec.num_register_tokens if spec.kind == "dinov2" else 0


def tower_features(tower: nn.Module, spec: ViTSpec, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch tokens after block ``num_layers - 2`` (0-based), before any final norm: [B, patches, width]."""
    h = tower.embeddings(pixel_values)
    # Only the hidden states go positionally, anything else by keyword: DINOv2's block takes no second argument
    # in some 5.x releases and an optional attention mask in others, while SigLIP's block requires
    # ``attention_mask``, so a positional extra breaks on one release or another.
    if spec.kind == "dinov2":
        for layer in tower.encoder.layer[: spec.num_layers - 1]:
            h = layer(h)
    else:
        for layer in tower.encoder.layers[: spec.num_layers - 1]:
            h = layer(h, attention_mask=None)
    return h[:, _prefix_tokens(spec):]


class FusedVisionBackbone(nn.Module):
    """``featurizer`` (DINOv2) and ``fused_featurizer`` (SigLIP), OpenVLA's attribute names."""

    def __init__(self, towers: list[ViTSpec]):
        super().__init__()
        if len(towers) != 2:
            raise ValueError("the fused backbone has exactly two towers")
        self.specs = list(towers)
        self.featurizer = build_tower(towers[0])
        self.fused_featurizer = build_tower(towers[1])

    @property
    def embed_dim(self) -> int:
        return sum(s.hidden_size for s in self.specs)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 6, H, W] (each tower's normalisation, channel-stacked) -> [B, patches, sum of widths]."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 6:
            raise ValueError(f"pixel_values must be [B, 6, H, W] (two normalised copies of the image stacked on "
                             f"channels); got {tuple(pixel_values.shape)}")
        dtype = self.featurizer.embeddings.patch_embeddings.projection.weight.dtype
        img, img_fused = torch.split(pixel_values.to(dtype), [3, 3], dim=1)
        return torch.cat([tower_features(self.featurizer, self.specs[0], img),
                          tower_features(self.fused_featurizer, self.specs[1], img_fused)], dim=2)
