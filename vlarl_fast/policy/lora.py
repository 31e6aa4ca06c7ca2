"""LoRA adapters on the policy's language model, through peft.

The adapters go into ``model.decoder`` (the transformer stack shared by every VLA of the protocol),
in place, with peft's ``inject_adapter_in_model``: the model keeps its own forward and its own
checkpoint format. A checkpoint of an adapted policy holds the base weights under their usual
names plus peft's two files (``adapter_config.json``, ``adapter_model.safetensors``); loading it
re-injects the adapters. ``merge_lora`` folds them into the base weights (W + B A * alpha / r) and
removes them, leaving a plain model.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: `pip install peft`") from None
    return peft


def has_lora(model) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def add_lora(model, *, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
             targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Inject LoRA adapters into ``model.decoder``'s linear layers named in ``targets``; returns the
    adapted module names. Only the adapters of the decoder stay trainable there (peft's rule); parameters
    outside the decoder keep their flags."""
    peft = _peft()
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1; got {rank}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters: merge them (merge_lora) before adding new ones")
    names = {n.rsplit(".", 1)[-1] for n, m in model.decoder.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = sorted(set(targets) - names)
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not linear layers of the language model; it has "
                         f"{sorted(names)}")
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
    peft.inject_adapter_in_model(cfg, model.decoder)
    model._lora_config = cfg
    return [n for n, m in model.decoder.named_modules() if hasattr(m, "lora_A")]


def merge_lora(model) -> int:
    """Fold every adapter into its base layer and put the plain layer back; returns how many were merged."""
    from peft.tuners.lora import LoraLayer
    merged = 0
    for name, module in list(model.decoder.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.decoder.get_submodule(parent_name) if parent_name else model.decoder
            setattr(parent, child, module.get_base_layer())
            merged += 1
    model.__dict__.pop("_lora_config", None)
    return merged


def base_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict under the plain model's names: adapter tensors dropped, peft's ``.base_layer`` removed."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def save_adapter(model, directory: str | Path) -> None:
    """peft's adapter files for ``model.decoder`` (nothing when the model has no adapters)."""
    if not has_lora(model):
        return
    peft = _peft()
    from safetensors.torch import save_file
    state = peft.get_peft_model_state_dict(model.decoder)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(Path(directory) / ADAPTER_WEIGHTS))
    cfg = model._lora_config.to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])
    (Path(directory) / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))


def load_adapter(model, directory: str | Path) -> bool:
    """Re-inject the adapters a checkpoint directory holds; False when it holds none."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        return False
    peft = _peft()
    from safetensors.torch import load_file
    cfg = json.loads((directory / ADAPTER_CONFIG).read_text())
    add_lora(model, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
             targets=tuple(cfg["target_modules"]))
    result = peft.set_peft_model_state_dict(model.decoder, load_file(str(directory / ADAPTER_WEIGHTS)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory}: adapter weights do not match {ADAPTER_CONFIG} (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]})")
    return True


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model's forward inside the block (every LoRA adapter off), the adapters back on after it: the
    KL penalty's reference policy at no cost in memory."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    trainable = {id(p): p.requires_grad for m in layers for p in m.parameters()}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for m in layers:   # peft's switch also flips requires_grad: restore what the trainer chose
            for p in m.parameters():
                p.requires_grad_(trainable[id(p)])
