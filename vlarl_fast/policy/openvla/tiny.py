"""A tiny OpenVLA-shaped model with random weights, for tests, benchmarks and CPU smoke runs.

Every tensor is drawn with a wide spread (layer scales, registers and cls positions included) rather than
transformers' 0.02 init: then a mapping that drops a tensor changes the outputs, and the action logits
are far apart, so greedy decoding compared across implementations is not decided by rounding-level ties.
"""
from __future__ import annotations

import torch

from .config import OpenVLAConfig
from .model import OpenVLAModel


def random_tiny_openvla(seed: int = 0, *, std: float = 0.2, value_hidden: int | None = 32,
                        **tiny_config) -> OpenVLAModel:
    """``OpenVLAConfig.tiny(**tiny_config)`` with N(0, std) weights (vectors N(0, 0.5)); a value head of width
    ``value_hidden`` (zero output until trained) unless None. Returned in eval mode."""
    torch.manual_seed(seed)
    model = OpenVLAModel(OpenVLAConfig.tiny(**tiny_config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("mask_token"):  # masked pre-training only: stays zero as in a checkpoint
                p.normal_(0.0, std if p.dim() > 1 else 0.5)
    if value_hidden is not None:
        model.add_value_head(value_hidden)
    return model.eval()
