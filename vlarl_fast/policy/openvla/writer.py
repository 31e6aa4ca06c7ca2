"""Write a model in OpenVLA's checkpoint directory format (the layout ``loader.py`` reads).

Tensors go out under OpenVLA's names, in safetensors shards with an index as transformers writes them,
so OpenVLA's own tooling (and vLLM's port) can read a full-size model written here. The directory is
written beside the target and renamed over it, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from ..action_convention import check_convention
from ..action_tokenizer import NormStats
from ..atomic_dir import atomic_directory
from ..lora import base_state_dict, save_adapter
from .loader import CONFIG, CONVENTION_KEY, PREPROCESSOR, STATS, VALUE_HEAD_FILE, WEIGHTS, WEIGHTS_INDEX
from .model import OpenVLAModel
from .names import to_openvla
from .preprocess import ImageProcessor


def stats_entry(stats: NormStats | dict) -> dict:
    """NormStats -> OpenVLA's per-dataset entry {"action": {...}}; dicts pass through."""
    if isinstance(stats, NormStats):
        return {"action": {k: v for k, v in asdict(stats).items() if v is not None}}
    return dict(stats)


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    return shards + [current] if current else shards


def save_openvla(model: OpenVLAModel, tokenizer, path: str | os.PathLike, *,
                 norm_stats: Mapping[str, NormStats | dict] | None = None, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = 5 * 1024**3, image_processor: ImageProcessor | None = None,
                 extra: dict | None = None, action_convention: str | None = None) -> Path:
    """Write config.json, safetensors shards (+ index when more than one), tokenizer files,
    dataset_statistics.json (``{dataset: {"action": ...}}``, also copied into config.json's norm_stats as
    OpenVLA does) and preprocessor_config.json. A value head, if the model has one, goes to its own file
    (``vlarl_value_head.safetensors``) that OpenVLA's code never reads; ``extra`` (training stage, step...)
    goes under config.json's ``vlarl_extra`` key, which OpenVLA's config ignores, and ``action_convention``
    under ``vlarl_action_convention`` (None: not recorded, so the loader infers it from the statistics key, as
    for a checkpoint released elsewhere)."""
    path = Path(path)
    if action_convention is not None:
        check_convention(action_convention)
    config = model.config
    stats = {k: stats_entry(v) for k, v in (norm_stats or {}).items()} or config.norm_stats
    tensors = to_openvla(base_state_dict(model.openvla_state_dict()), config)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in tensors.items()}

    with atomic_directory(path) as tmp:
        cfg = config.to_dict()
        cfg["norm_stats"] = stats
        if extra:
            cfg["vlarl_extra"] = extra
        if action_convention is not None:
            cfg[CONVENTION_KEY] = action_convention
        if dtype is not None:
            cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for name, t in shard.items():
                    weight_map[name] = fname
                    total += t.numel() * t.element_size()
            (tmp / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=2))
        tokenizer.save_pretrained(str(tmp))
        save_adapter(model, tmp)
        if stats:
            (tmp / STATS).write_text(json.dumps(stats, indent=2))
        if model.value_head is not None:
            head = {k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()}
            save_file(head, str(tmp / VALUE_HEAD_FILE), metadata={"detach": str(int(model.value_detach))})
        processor = image_processor or model.image_processor
        (tmp / PREPROCESSOR).write_text(json.dumps(processor.to_preprocessor_config(), indent=2))
    return path
