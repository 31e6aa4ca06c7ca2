"""OpenVLA-shaped models with random weights, for tests, benchmarks and CPU smoke runs: a tiny one, and any
configuration built as a checkpoint is (``random_openvla``: a 7B shape costs its bfloat16 weights once).

Every tensor is drawn with a wide spread (layer scales, registers and cls positions included) rather than
transformers' 0.02 init: then a mapping that drops a tensor changes the outputs, and the action logits
are far apart, so greedy decoding compared across implementations is not decided by rounding-level ties.
"""
from __future__ import annotations

import torch

from .config import OpenVLAConfig
from .loader import parameters_on_meta
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


def random_openvla(config: OpenVLAConfig, device, dtype, *, seed: int = 0, std: float = 0.02,
                   value_hidden: int = 64) -> OpenVLAModel:
    """An OpenVLA of ``config`` with random weights made as ``load_openvla`` makes a checkpoint's model:
    parameters built on the meta device, then tensors of ``dtype`` assigned on ``device`` (a 7B model
    costs its bfloat16 weights once). Matrices N(0, std) (Llama's initializer range), norm scales 1,
    biases 0; a float32 value head of width ``value_hidden``."""
    with parameters_on_meta():
        model = OpenVLAModel(config)
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, device=device, dtype=dtype)
        if p.dim() > 1:
            t.normal_(0.0, std, generator=g)
        else:
            t.fill_(0.0 if name.endswith("bias") else 1.0)
        state[name] = t
    model.load_state_dict(state, strict=False, assign=True)
    model.to(device)
    model.add_value_head(value_hidden)
    return model.eval()
