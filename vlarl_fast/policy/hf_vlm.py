"""Any native transformers image-text-to-text model as the policy's backbone.

Models whose ``*ForConditionalGeneration`` holds ``model.vision_tower``, ``model.multi_modal_projector``,
``model.language_model`` and ``lm_head`` and whose ``model.get_image_features`` returns the projected
image tokens (LLaVA, PaliGemma and their kin in transformers 5) get the policy API
(``protocol.VLAModel``) from ``HFVLAModel``:

- prompts are laid out as OpenVLA lays them out, [pad..., BOS, image tokens, prompt...], with
  OpenVLA's wording; the model's own chat template is not used (RL fine-tuning teaches the layout);
- the actions are OpenVLA's: the last 256 ids of the text vocabulary are the bins;
- a value head (zero-initialised last layer) reads the hidden state of the last prompt column.

A checkpoint is the model's own ``save_pretrained`` directory (loadable by transformers alone), the
tokenizer, dataset_statistics.json, and vlarl-fast's two extra files: ``vlarl_hf_vlm.json`` (image
normalisation, critic settings, the policy's action convention) and ``vlarl_value_head.safetensors``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .action_tokenizer import N_BINS
from .protocol import insert_after_bos, make_value_head
from .text_tokenizer import prompt_text

SETTINGS = "vlarl_hf_vlm.json"
VALUE_HEAD_FILE = "vlarl_value_head.safetensors"
# image normalisation of the vision towers these families ship with
IMAGE_NORM = {"llava": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
              "paligemma": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


@dataclass
class HFVLAConfig:
    """What the trainer reads of a policy's config, plus the adapter's own settings."""

    image_size: int
    num_image_tokens: int
    feature_dim: int
    model_type: str
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    value_hidden: int = 1024
    value_detach: bool = True
    state_dim: int = 8
    use_state: bool = False   # these backbones take no proprio token

    def to_dict(self) -> dict:
        return asdict(self)


def _parts(vlm):
    inner = getattr(vlm, "model", None)
    missing = [n for n in ("vision_tower", "multi_modal_projector", "language_model", "get_image_features")
               if not hasattr(inner, n)]
    missing = [f"model.{n}" for n in missing] + ([] if hasattr(vlm, "lm_head") else ["lm_head"])
    if missing:
        raise TypeError(f"{type(vlm).__name__} is not a supported image-text-to-text model: it lacks "
                        f"{', '.join(missing)} (LLaVA- and PaliGemma-style models have them)")
    return inner


class HFVLAModel(nn.Module):
    def __init__(self, vlm, *, value_hidden: int = 1024, value_detach: bool = True,
                 image_mean: tuple | None = None, image_std: tuple | None = None):
        super().__init__()
        _parts(vlm)
        self.vlm = vlm
        cfg = vlm.config
        vision = cfg.vision_config
        mean, std = IMAGE_NORM.get(cfg.model_type, ((0.5,) * 3, (0.5,) * 3))
        text_vocab = cfg.text_config.vocab_size
        if text_vocab <= N_BINS:
            raise ValueError(f"the text vocabulary ({text_vocab} ids) must be larger than the {N_BINS} action bins")
        with torch.no_grad():
            probe = self._features(torch.zeros(1, 3, vision.image_size, vision.image_size,
                                               dtype=vlm.lm_head.weight.dtype, device=vlm.lm_head.weight.device))
        self.config = HFVLAConfig(image_size=vision.image_size, num_image_tokens=probe.shape[1],
                                  feature_dim=probe.shape[2], model_type=cfg.model_type,
                                  image_mean=tuple(image_mean or mean), image_std=tuple(image_std or std),
                                  value_hidden=value_hidden, value_detach=value_detach)
        self.value_head = make_value_head(cfg.text_config.hidden_size, value_hidden).to(vlm.lm_head.weight.device)
        self.register_buffer("image_mean", torch.tensor(self.config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(self.config.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def vision_tower(self) -> nn.Module:
        """The modules ``encode_images`` runs (frozen with --ppo.freeze-vision)."""
        return nn.ModuleList([self.vlm.model.vision_tower, self.vlm.model.multi_modal_projector])

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.vlm.model.get_image_features(pixel_values=pixels)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    # ---- the VLA model API (protocol.VLAModel) --------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.vlm.model.language_model

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.vlm.lm_head.weight

    @property
    def vocab_end(self) -> int:
        return self.vlm.config.text_config.vocab_size

    @property
    def vocab_start(self) -> int:
        return self.vocab_end - N_BINS

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.vlm.get_input_embeddings()(ids)

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [B, H, W, 3]; got {images.dtype} {tuple(images.shape)}")
        if images.shape[1:3] != (size, size):
            raise ValueError(f"this backbone expects {size}x{size} images, got {images.shape[1]}x{images.shape[2]}: "
                             f"make the env with image_size={size}")
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.image_mean) / self.image_std
        return x.to(self.lm_head_weight.dtype)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector: the image tokens, already in the language model's width."""
        return self._features(pixels)

    def project_images(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def prompt_ids(self, tokenizer, instruction: str) -> list[int]:
        ids = tokenizer(prompt_text(instruction, "openvla"), add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + list(ids)

    def prompt_embeds(self, vision_feats, states, text_ids, text_mask):
        """[pad..., BOS, image tokens, prompt...]; ``states`` is ignored (no proprio input)."""
        if vision_feats.shape[0] != text_ids.shape[0]:
            raise ValueError(f"{vision_feats.shape[0]} images for {text_ids.shape[0]} prompts: one image per prompt")
        return insert_after_bos(self.embed_tokens(text_ids), text_mask, self.project_images(vision_feats))

    def value_from_hidden(self, h_last: torch.Tensor) -> torch.Tensor:
        if self.config.value_detach:
            h_last = h_last.detach()
        return self.value_head(h_last.to(self.value_head[0].weight.dtype)).float().squeeze(-1)


def is_hf_vlm_checkpoint(path: Path) -> bool:
    """A directory written by ``save_hf_vlm``, or a transformers image-text-to-text checkpoint."""
    path = Path(path)
    if (path / SETTINGS).is_file():
        return True
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except ValueError:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type != "openvla"


def save_hf_vlm(model: HFVLAModel, tokenizer, path: Path, *, action_convention: str | None = None) -> None:
    """Into ``path`` (an existing, empty directory): the backbone, tokenizer, settings and critic;
    ``action_convention`` (the policy's, ``action_convention.py``) is recorded among the settings."""
    from safetensors.torch import save_file

    from .action_convention import RECORD_KEY
    from .lora import base_state_dict, save_adapter
    path = Path(path)
    model.vlm.save_pretrained(str(path), state_dict=base_state_dict(model.vlm.state_dict()))
    tokenizer.save_pretrained(str(path))
    settings = model.config.to_dict() | ({} if action_convention is None else {RECORD_KEY: action_convention})
    (path / SETTINGS).write_text(json.dumps(settings, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()},
              str(path / VALUE_HEAD_FILE))
    save_adapter(model, path)


def load_hf_vlm(path: Path, device="cpu", dtype: torch.dtype | None = None):
    """(HFVLAModel, tokenizer) from a ``save_hf_vlm`` directory or a plain transformers checkpoint (then with a
    fresh critic)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from .lora import load_adapter
    path = Path(path)
    settings = json.loads((path / SETTINGS).read_text()) if (path / SETTINGS).is_file() else {}
    vlm = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
    model = HFVLAModel(vlm, value_hidden=settings.get("value_hidden", 1024),
                       value_detach=settings.get("value_detach", True), image_mean=settings.get("image_mean"),
                       image_std=settings.get("image_std"))
    if (path / VALUE_HEAD_FILE).is_file():
        model.value_head.load_state_dict(load_file(str(path / VALUE_HEAD_FILE)))
    load_adapter(model, path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    return model.to(device).eval(), tok
