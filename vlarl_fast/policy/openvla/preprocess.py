"""OpenVLA's image preprocessing, batched on the images' device (no PIL, no torchvision).

OpenVLA's processor (``PrismaticImageProcessor``) runs, per tower: resize to the tower's size (bicubic,
antialiased; 'resize-naive' ignores the aspect ratio, 'letterbox' first pads to a square with the tower's
mean colour), centre crop (a no-op after the resize), scale to [0, 1], normalise with the tower's
mean/std; then stacks the two results on channels: [B, 6, 224, 224] for DINOv2 (ImageNet statistics)
+ SigLIP (0.5/0.5). At 224 px input the resize is the identity, as PIL's is; other sizes go through
torch's bicubic filter, which is close to PIL's but not bit-identical. LIBERO's 180-degree flip and the
optional centre crop belong to the env adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import OpenVLAConfig

STRATEGIES = ("resize-naive", "letterbox")


@dataclass
class ImageProcessor:
    image_size: int
    means: list[tuple[float, float, float]]
    stds: list[tuple[float, float, float]]
    resize_strategy: str = "resize-naive"

    def __post_init__(self):
        if self.resize_strategy not in STRATEGIES:
            raise ValueError(f"image_resize_strategy {self.resize_strategy!r} is not supported "
                             f"(use one of {STRATEGIES})")
        if len(self.means) != 2 or len(self.stds) != 2:
            raise ValueError("the fused backbone needs two normalisations (one per tower)")

    @classmethod
    def from_config(cls, config: OpenVLAConfig) -> "ImageProcessor":
        return cls(config.image_size, [t.mean for t in config.towers], [t.std for t in config.towers],
                   config.image_resize_strategy)

    @classmethod
    def from_preprocessor_config(cls, d: dict, config: OpenVLAConfig) -> "ImageProcessor":
        """OpenVLA's preprocessor_config.json (its ``input_sizes``, ``means``, ``stds``, resize strategy)."""
        sizes = {tuple(s)[-1] for s in d.get("input_sizes", [[3, config.image_size, config.image_size]])}
        if sizes != {config.image_size}:
            raise ValueError(f"preprocessor_config.json input sizes {sorted(sizes)} disagree with config.json's "
                             f"image size {config.image_size}")
        means = [tuple(m) for m in d.get("means", [t.mean for t in config.towers])]
        stds = [tuple(s) for s in d.get("stds", [t.std for t in config.towers])]
        return cls(config.image_size, means, stds, d.get("image_resize_strategy", config.image_resize_strategy))

    def to_preprocessor_config(self) -> dict:
        s = self.image_size
        return {
            "image_processor_type": "PrismaticImageProcessor",
            "processor_class": "PrismaticProcessor",
            "image_resize_strategy": self.resize_strategy,
            "input_sizes": [[3, s, s], [3, s, s]],
            "interpolations": ["bicubic", "bicubic"],
            "means": [list(m) for m in self.means],
            "stds": [list(x) for x in self.stds],
            "tvf_crop_params": [{"output_size": [s, s]}] * 2,
            "tvf_do_letterbox": self.resize_strategy == "letterbox",
            "tvf_letterbox_fill": ([int(x * 255) for x in self.means[0]] if self.resize_strategy == "letterbox"
                                   else None),
            "tvf_normalize_params": [{"inplace": False, "mean": list(m), "std": list(x)}
                                     for m, x in zip(self.means, self.stds)],
            "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None, "size": [s, s]}] * 2,
            "use_fused_vision_backbone": True,
        }

    # ---- the transform ------------------------------------------------------------------------
    def _as_batch(self, images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise ValueError(f"images must be uint8 RGB [B, H, W, 3]; got dtype {images.dtype} "
                                 "(convert with (x * 255).round().astype(np.uint8) if they are floats in [0, 1])")
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a uint8 numpy array or tensor [B, H, W, 3]; got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 RGB [B, H, W, 3]; got dtype {images.dtype}")
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] (channels last, RGB); got shape {tuple(images.shape)}")
        if images.shape[1] < 2 or images.shape[2] < 2:
            raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} pixels are too small to resize")
        return images

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, 3, H, W] in 0..255 -> [B, 3, S, S], rounded to integers as PIL's uint8 output is."""
        s = self.image_size
        if x.shape[-2:] == (s, s):
            return x
        x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
        return x.round_().clamp_(0, 255)

    @staticmethod
    def _letterbox(x: torch.Tensor, mean) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h == w:
            return x
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        fill = torch.tensor([int(m * 255) for m in mean], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        out = fill.expand(x.shape[0], 3, side, side).clone()
        out[:, :, top:top + h, left:left + w] = x
        return out

    def __call__(self, images, device=None, dtype=torch.float32) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> pixel_values [B, 6, S, S] (DINOv2-normalised, then SigLIP-normalised)."""
        x = self._as_batch(images)
        if device is not None:
            x = x.to(device)
        x = x.permute(0, 3, 1, 2).float()
        letterbox = self.resize_strategy == "letterbox"
        shared = None if letterbox else self._resize(x) / 255.0  # both towers see the same resized image
        outs = []
        for mean, std in zip(self.means, self.stds):
            y = self._resize(self._letterbox(x, mean)) / 255.0 if letterbox else shared
            m = torch.tensor(mean, device=y.device).view(1, 3, 1, 1)
            sd = torch.tensor(std, device=y.device).view(1, 3, 1, 1)
            outs.append((y - m) / sd)
        return torch.cat(outs, 1).to(dtype)
