"""Read an OpenVLA checkpoint directory without its remote code.

The directory is what ``openvla/openvla-7b`` (and its fine-tunes) ship:

    config.json                       model_type "openvla", timm_model_ids, text_config, norm_stats, ...
    model.safetensors.index.json      weight_map: OpenVLA tensor name -> shard file
    model-0000k-of-0000n.safetensors  (or a single model.safetensors)
    tokenizer.json / tokenizer.model  + tokenizer_config.json (Llama-2 tokenizer with <PAD> = 32000)
    dataset_statistics.json           {dataset: {"action": {q01, q99, mask, ...}, ...}}  (also in norm_stats)
    preprocessor_config.json          optional: per-tower sizes, means and stds
    vlarl_value_head.safetensors      optional, vlarl-fast's own: the critic's weights (OpenVLA has none)

config.json may also hold vlarl-fast's own keys, which OpenVLA's code ignores: ``vlarl_extra`` (training
stage...) and ``vlarl_action_convention`` (how decoded actions become env actions).

The model is built with its parameters on the meta device, so a 7B checkpoint costs its weights' memory
once, then every tensor is checked by name and shape (``names.py``) and assigned.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaTokenizer

from ..action_convention import AUTO, RECORD_KEY, ActionConventionError, resolve_convention
from ..action_tokenizer import ACTION_DIM, NormStats
from ..checkpoint import CheckpointError
from ..lora import load_adapter
from .config import MODEL_TYPE, OpenVLAConfig
from .model import OpenVLAModel
from .names import MappingError, from_openvla
from .preprocess import ImageProcessor

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
STATS = "dataset_statistics.json"
PREPROCESSOR = "preprocessor_config.json"
VALUE_HEAD_FILE = "vlarl_value_head.safetensors"
CONVENTION_KEY = "vlarl_" + RECORD_KEY  # in config.json, beside vlarl_extra: OpenVLA's code ignores both
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
LAYOUT = ("config.json, model.safetensors.index.json + its shards (or model.safetensors), tokenizer files "
          "and dataset_statistics.json")


class OpenVLACheckpointError(CheckpointError):
    pass


@dataclass
class OpenVLABundle:
    """Everything a policy needs from one checkpoint directory."""

    model: OpenVLAModel
    tokenizer: object
    config: OpenVLAConfig
    image_processor: ImageProcessor
    norm_stats: NormStats | None
    unnorm_key: str | None
    path: Path
    action_convention: str = "identity"   # decoded -> env actions (policy/action_convention.py)


def is_openvla_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def read_config(path: Path) -> OpenVLAConfig:
    if not path.is_dir():
        raise OpenVLACheckpointError(f"no OpenVLA checkpoint at {str(path)!r}: not a directory "
                                     f"(an OpenVLA checkpoint directory holds {LAYOUT})")
    if not (path / CONFIG).is_file():
        raise OpenVLACheckpointError(f"{path} is not an OpenVLA checkpoint: no {CONFIG} (expected {LAYOUT})")
    try:
        raw = json.loads((path / CONFIG).read_text())
    except ValueError as e:
        raise OpenVLACheckpointError(f"{path / CONFIG} is not valid JSON: {e}") from e
    if raw.get("model_type") != MODEL_TYPE:
        raise OpenVLACheckpointError(
            f"{path / CONFIG} has model_type {raw.get('model_type')!r}, not {MODEL_TYPE!r}: not an OpenVLA "
            "checkpoint (vlarl-fast's own checkpoints load with vlarl_fast.policy.load_policy)")
    try:
        return OpenVLAConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise OpenVLACheckpointError(f"{path / CONFIG}: {e}") from e


def read_norm_stats(path: Path, config: OpenVLAConfig, unnorm_key: str | None) -> tuple[str | None, NormStats | None]:
    """dataset_statistics.json (else config.json's norm_stats) -> the chosen dataset's action statistics.

    As OpenVLA's ``predict_action``: with one dataset the key may be omitted; with several it must be given."""
    if (path / STATS).is_file():
        stats, source = json.loads((path / STATS).read_text()), path / STATS
    else:
        stats, source = config.norm_stats, path / CONFIG
    if not stats:
        if unnorm_key is not None:
            raise OpenVLACheckpointError(f"{path} has no action statistics ({STATS} or config.json norm_stats), "
                                         f"so unnorm_key={unnorm_key!r} cannot be used")
        return None, None
    keys = sorted(stats)
    if unnorm_key is None:
        if len(keys) != 1:
            raise OpenVLACheckpointError(f"{source} holds action statistics for {len(keys)} datasets; choose one "
                                         f"with unnorm_key, one of: {', '.join(keys)}")
        unnorm_key = keys[0]
    if unnorm_key not in stats:
        raise OpenVLACheckpointError(f"no action statistics for unnorm_key {unnorm_key!r} in {source}; "
                                     f"available: {', '.join(keys)}")
    a = stats[unnorm_key].get("action")
    if not a or "q01" not in a or "q99" not in a:
        raise OpenVLACheckpointError(f"{source}: {unnorm_key!r} has no action q01/q99 statistics")
    dim = len(a["q01"])
    if dim != ACTION_DIM or len(a["q99"]) != dim:
        raise OpenVLACheckpointError(f"{source}: {unnorm_key!r} has {dim}-D action statistics; the policy emits "
                                     f"{ACTION_DIM}-D actions")
    mask = a.get("mask", [True] * dim)
    return unnorm_key, NormStats(q01=list(a["q01"]), q99=list(a["q99"]), mask=list(mask),
                                 mean=a.get("mean"), std=a.get("std"))


def read_action_convention(path: Path, requested: str, unnorm_key: str | None) -> str:
    """``requested``, or for 'auto' the convention config.json records (a checkpoint saved here), else the one
    the statistics key implies: OpenVLA's LIBERO fine-tunes (``libero_*``) flip and binarise the gripper."""
    recorded = json.loads((path / CONFIG).read_text()).get(CONVENTION_KEY)
    try:
        return resolve_convention(requested, recorded=recorded, unnorm_key=unnorm_key,
                                  source=str(path / CONFIG), key=CONVENTION_KEY)
    except ActionConventionError as e:
        raise OpenVLACheckpointError(str(e)) from None


def weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((path / WEIGHTS_INDEX).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise OpenVLACheckpointError(f"{path / WEIGHTS_INDEX} is not a safetensors index "
                                         f"(no weight_map): {e}") from e
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise OpenVLACheckpointError(f"{path}: shards listed in {WEIGHTS_INDEX} are missing: "
                                         f"{', '.join(missing)} (copy or download them again)")
        return [path / s for s in shards]
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    raise OpenVLACheckpointError(f"{path} has no weights: neither {WEIGHTS_INDEX} nor {WEIGHTS} (expected {LAYOUT})")


def read_tensors(files: list[Path], device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f), device=str(device))
        except (SafetensorError, OSError) as e:
            raise OpenVLACheckpointError(f"{f} is not a readable safetensors file: {e}") from e
        for k, v in part.items():
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def read_tokenizer(path: Path, config: OpenVLAConfig):
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise OpenVLACheckpointError(f"{path} has no tokenizer: neither {' nor '.join(TOKENIZER_FILES)} "
                                     "(copy the tokenizer files of the checkpoint into the directory)")
    cls_name = ""
    if (path / "tokenizer_config.json").is_file():
        cls_name = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class") or ""
    # OpenVLA's tokenizer_config names LlamaTokenizer but also an auto_map to its remote processor, which
    # sends AutoTokenizer to a generic backend class: ask for the Llama class directly.
    if cls_name.startswith("LlamaTokenizer"):
        tok = LlamaTokenizer.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if len(tok) > config.text["vocab_size"]:
        raise OpenVLACheckpointError(f"{path}: the tokenizer has {len(tok)} ids but the language model only "
                                     f"{config.text['vocab_size']}: tokenizer and weights are from different models")
    return tok


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device and their buffers (RoPE frequencies,
    position ids: computed at construction, never saved) on the CPU as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_value_head(model: OpenVLAModel, path: Path, value_hidden: int | None, detach: bool | None) -> None:
    """Attach the stored critic if the directory has one, else a fresh one when ``value_hidden`` asks for it."""
    f = path / VALUE_HEAD_FILE
    if f.is_file():
        try:
            with safe_open(str(f), framework="pt") as g:
                stored_detach = (g.metadata() or {}).get("detach", "0") == "1"
            head = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise OpenVLACheckpointError(f"{f} is not a readable safetensors file: {e}") from e
        if "0.weight" not in head or head["0.weight"].shape[1] != model.config.llm_dim:
            raise OpenVLACheckpointError(f"{f} does not hold a value head for a {model.config.llm_dim}-wide language "
                                         "model: it comes from another model; delete it to start a fresh critic")
        model.add_value_head(head["0.weight"].shape[0], detach=stored_detach if detach is None else detach)
        model.value_head.load_state_dict({k: v.to(model.value_head[0].weight.device) for k, v in head.items()})
    elif value_hidden is not None:
        model.add_value_head(value_hidden, detach=bool(detach))


def load_openvla(path: str | os.PathLike, *, unnorm_key: str | None = None, device="cpu",
                 dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                 value_hidden: int | None = None, value_detach: bool | None = None,
                 action_convention: str = AUTO) -> OpenVLABundle:
    """Load model, tokenizer, image processor and the ``unnorm_key`` action statistics.

    ``dtype`` None keeps the stored dtype (OpenVLA ships bf16); buffers stay float32 either way. A value head
    stored beside the weights (``vlarl_value_head.safetensors``) is loaded; without one, ``value_hidden`` adds a
    fresh zero-output head of that width (float32 on ``device``). ``action_convention``: see
    ``read_action_convention``."""
    path = Path(path)
    config = read_config(path)
    files = weight_files(path)
    tokenizer = read_tokenizer(path, config)
    key, stats = read_norm_stats(path, config, unnorm_key)
    convention = read_action_convention(path, action_convention, key)
    if (path / PREPROCESSOR).is_file():
        processor = ImageProcessor.from_preprocessor_config(json.loads((path / PREPROCESSOR).read_text()), config)
    else:
        processor = ImageProcessor.from_config(config)

    with parameters_on_meta():
        model = OpenVLAModel(config, attn_implementation=attn_implementation)
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    tensors = read_tensors(files, device, dtype)
    try:
        state = from_openvla(tensors, config, shapes, source=str(path))
    except MappingError as e:
        raise OpenVLACheckpointError(str(e)) from e
    del tensors
    model.load_state_dict(state, strict=True, assign=True)
    model.image_processor = processor
    model.to(device)
    read_value_head(model, path, value_hidden, value_detach)
    load_adapter(model, path)
    model.eval()
    return OpenVLABundle(model, tokenizer, config, processor, stats, key, path, convention)
