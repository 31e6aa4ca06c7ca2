"""Save and load a policy as a directory: config.json, model.safetensors, tokenizer files,
dataset_statistics.json (OpenVLA's name and shape for the q01/q99 statistics).

OpenVLA checkpoint directories (config.json with model_type "openvla") go through
``openvla.load_openvla`` / ``save_openvla`` instead, in OpenVLA's own layout, with a value head added
for PPO (stored beside OpenVLA's tensors, never among them).

Every format records the policy's action convention (``action_convention.py``) in a vlarl-fast key of its
own JSON: config.json's ``action_convention`` here, ``vlarl_action_convention`` in an OpenVLA config.json,
``action_convention`` in ``vlarl_hf_vlm.json``. Loading with 'auto' takes the recorded one, so a checkpoint
comes back acting as it was saved; an OpenVLA checkpoint from elsewhere gets the one its statistics key
implies."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from .action_convention import AUTO, RECORD_KEY, ActionConventionError, resolve_convention
from .action_tokenizer import NormStats
from .atomic_dir import atomic_directory
from .critic import load_critic, save_critic
from .lora import base_state_dict, load_adapter, save_adapter
from .model import TinyVLA, VLAConfig
from .policy import VLAPolicy
from .precision import resolve_attention, resolve_dtype, set_attention
from .text_tokenizer import build_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATS = "dataset_statistics.json"
PRESETS = ("tiny",)
DEFAULT_VALUE_HIDDEN = 1024


class CheckpointError(ValueError):
    pass


def _is_openvla(model) -> bool:
    from .openvla import OpenVLAModel  # late: openvla's loader imports this module's CheckpointError
    return isinstance(model, OpenVLAModel)


def save_policy(policy: VLAPolicy, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write atomically: a temp directory beside the target, then rename over it. The critic's choice (and a
    separate critic's weights) go beside the model in every format."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        _save_model(policy, tmp, extra)
        save_critic(tmp, policy.critic_kind, policy.value_pooling, policy.critic)
    return path


def _save_model(policy: VLAPolicy, tmp: Path, extra: dict | None) -> None:
    if _is_openvla(policy.model):
        from .openvla import save_openvla
        stats = {policy.unnorm_key or "vlarl": policy.norm_stats} if policy.norm_stats is not None else None
        save_openvla(policy.model, policy.tokenizer, tmp, norm_stats=stats,
                     image_processor=policy.model.image_processor, extra=extra,
                     action_convention=policy.action_convention)
        return
    from .hf_vlm import HFVLAModel, save_hf_vlm
    if isinstance(policy.model, HFVLAModel):
        save_hf_vlm(policy.model, policy.tokenizer, tmp, action_convention=policy.action_convention)
        if policy.norm_stats is not None:
            policy.norm_stats.save(tmp / STATS)
        return
    cfg = policy.config.to_dict()
    (tmp / CONFIG).write_text(json.dumps(cfg | {"extra": extra or {}, RECORD_KEY: policy.action_convention},
                                         indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in base_state_dict(policy.model.state_dict()).items()}
    save_file(state, str(tmp / WEIGHTS))
    save_adapter(policy.model, tmp)
    policy.tokenizer.save_pretrained(str(tmp))
    if policy.norm_stats is not None:
        policy.norm_stats.save(tmp / STATS)


def load_policy(path: str | os.PathLike, device="cpu", *, unnorm_key: str | None = None,
                dtype: torch.dtype | None = None, value_hidden: int = DEFAULT_VALUE_HIDDEN,
                action_convention: str = AUTO) -> VLAPolicy:
    """A vlarl-fast checkpoint, or an OpenVLA one (``unnorm_key`` picks its action statistics; ``dtype``, e.g.
    torch.bfloat16 on a GPU, its weights' dtype; a fresh critic of width ``value_hidden`` when it has none).
    ``action_convention``: 'auto' (the recorded one, else the one the statistics key implies) or a name from
    ``action_convention.CONVENTIONS``."""
    policy = _load_model(Path(path), device, unnorm_key, dtype, value_hidden, action_convention)
    try:
        kind, pooling, critic = load_critic(Path(path), policy.model.decoder, policy.model.lm_head_weight.shape[1])
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    policy.critic_kind, policy.value_pooling = kind, pooling
    policy.critic = None if critic is None else critic.to(policy.device)
    return policy


def _convention(requested: str, recorded: str | None, source: Path) -> str:
    try:
        return resolve_convention(requested, recorded=recorded, unnorm_key=None, source=str(source))
    except ActionConventionError as e:
        raise CheckpointError(str(e)) from None


def _load_model(path: Path, device, unnorm_key, dtype, value_hidden, action_convention) -> VLAPolicy:
    from .openvla import is_openvla_checkpoint, load_openvla
    if is_openvla_checkpoint(path):
        b = load_openvla(path, unnorm_key=unnorm_key, device=device, dtype=dtype, value_hidden=value_hidden,
                         action_convention=action_convention)
        return VLAPolicy(b.model, b.tokenizer, b.norm_stats, device=device, unnorm_key=b.unnorm_key,
                         action_convention=b.action_convention)
    if unnorm_key is not None:
        raise CheckpointError(f"unnorm_key={unnorm_key!r} is for OpenVLA checkpoints; {path} is not one "
                              "(vlarl-fast checkpoints hold one set of action statistics)")
    from .hf_vlm import SETTINGS, is_hf_vlm_checkpoint, load_hf_vlm
    if path.is_dir() and is_hf_vlm_checkpoint(path):
        settings = json.loads((path / SETTINGS).read_text()) if (path / SETTINGS).is_file() else {}
        convention = _convention(action_convention, settings.get(RECORD_KEY), path / SETTINGS)
        model, tok = load_hf_vlm(path, device=device, dtype=dtype)
        stats = NormStats.load(path / STATS) if (path / STATS).exists() else None
        return VLAPolicy(model, tok, stats, device=device, action_convention=convention)
    if not path.is_dir():
        raise CheckpointError(f"policy {str(path)!r} is neither a checkpoint directory nor a preset "
                              f"(presets: {', '.join(PRESETS)})")
    missing = [f for f in (CONFIG, WEIGHTS) if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"{path} is not a vlarl-fast checkpoint: missing {', '.join(missing)} "
                              "(a checkpoint directory holds config.json, model.safetensors, tokenizer files "
                              "and dataset_statistics.json, as written by `vlarl-fast train`/`sft`)")
    cfg = json.loads((path / CONFIG).read_text())
    cfg.pop("extra", None)
    convention = _convention(action_convention, cfg.pop(RECORD_KEY, None), path / CONFIG)
    if cfg.get("model_type") != VLAConfig.model_type:
        raise CheckpointError(f"{path} holds a {cfg.get('model_type')!r} model; this loader reads "
                              f"{VLAConfig.model_type!r} checkpoints")
    config = VLAConfig.from_dict(cfg)
    model = TinyVLA(config)
    state = load_file(str(path / WEIGHTS))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not match the config (missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.padding_side = "left"
    stats = NormStats.load(path / STATS) if (path / STATS).exists() else None
    load_adapter(model, path)
    model.eval()
    return VLAPolicy(model, tok, stats, device=device, action_convention=convention)


def make_policy(spec: str, *, instructions: list[str] | None = None, image_size: int = 64, seed: int = 0,
                device="cpu", unnorm_key: str | None = None, dtype: str = "auto", attn_implementation: str = "auto",
                action_convention: str = AUTO, **overrides) -> VLAPolicy:
    """A checkpoint directory (vlarl-fast's or OpenVLA's; ``overrides`` size only the preset), or the preset
    ``tiny`` (randomly initialised). ``dtype`` and ``attn_implementation``: see ``precision``;
    ``action_convention``: see ``load_policy`` (the preset's 'auto' is 'identity')."""
    pretrained = spec not in PRESETS
    torch_dtype = resolve_dtype(dtype, device, pretrained=pretrained)
    if not pretrained:
        if unnorm_key is not None:
            raise CheckpointError(f"unnorm_key={unnorm_key!r} needs an OpenVLA checkpoint; the preset {spec!r} has "
                                  "no action statistics")
        torch.manual_seed(seed)
        config = VLAConfig(image_size=image_size, **overrides)
        tok = build_tokenizer(instructions or [], text_vocab_size=config.text_vocab_size)
        policy = VLAPolicy(TinyVLA(config).eval(), tok, None, device=device,
                           action_convention=_convention(action_convention, None, Path(spec)))
    else:
        policy = load_policy(spec, device=device, unnorm_key=unnorm_key,
                             dtype=None if dtype == "auto" and torch_dtype == torch.float32 else torch_dtype,
                             action_convention=action_convention)
        if isinstance(policy.model, TinyVLA) and dtype not in ("auto", "float32"):
            resolve_dtype(dtype, device, pretrained=False)   # the tiny VLA's error
    # the kernel follows the weights as loaded (a vlarl-fast tiny checkpoint stays float32 on a GPU too)
    set_attention(policy.model, resolve_attention(attn_implementation, device, policy.model.lm_head_weight.dtype))
    return policy
