"""LIBERO camera frames -> the images a VLA policy was trained on.

The documented transforms, in order (OpenVLA's LIBERO evaluation, which VLA-RL and its successors copy):

1. rotate 180 degrees: robosuite hands LIBERO's frames over upside down (OpenGL's bottom-up rows, seen
   through LIBERO's camera mounts), while the data policies are fine-tuned on (OpenVLA's LIBERO RLDS sets)
   holds them upright;
2. optional centre crop keeping ``center_crop`` of the area (OpenVLA's ``center_crop=True`` is 0.9, for
   checkpoints trained with random-crop augmentation);
3. optional JPEG round trip at ``jpeg_quality`` (OpenVLA's script re-encodes as its RLDS training data was);
4. resize to ``size`` x ``size`` with a Lanczos-3 filter (OpenVLA's choice), skipped when already that size.

OpenVLA resizes to 224 first and crops afterwards (two resamplings); cropping the 256 px frame and
resizing once keeps more detail and gives the same framing.
"""
from __future__ import annotations

import io
import math

import numpy as np


def check_options(size: int, center_crop: float | None, jpeg_quality: int | None) -> None:
    if not 16 <= int(size) <= 1024:
        raise ValueError(f"image_size must be in [16, 1024]; got {size}")
    if center_crop is not None and not 0.0 < float(center_crop) <= 1.0:
        raise ValueError(f"center_crop is the kept fraction of the image area, in (0, 1] (OpenVLA uses 0.9); "
                         f"got {center_crop}")
    if jpeg_quality is not None and not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100] (OpenVLA's RLDS data: 95) or None; got {jpeg_quality}")


def crop_box(height: int, width: int, center_crop: float) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the centred crop keeping ``center_crop`` of the area."""
    side = math.sqrt(center_crop)
    h, w = max(1, round(height * side)), max(1, round(width * side))
    top, left = (height - h) // 2, (width - w) // 2
    return top, left, top + h, left + w


def to_policy_image(frame: np.ndarray, size: int, *, center_crop: float | None = None,
                    jpeg_quality: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] as rendered -> uint8 [size, size, 3], C-contiguous."""
    check_options(size, center_crop, jpeg_quality)
    img = np.asarray(frame)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] frame; got {img.dtype} {img.shape}")
    img = img[::-1, ::-1]
    if center_crop is not None and center_crop < 1.0:
        t, l, b, r = crop_box(img.shape[0], img.shape[1], center_crop)
        img = img[t:b, l:r]
    if jpeg_quality is None and img.shape[:2] == (size, size):
        return np.ascontiguousarray(img)
    from PIL import Image
    pil = Image.fromarray(np.ascontiguousarray(img))
    if jpeg_quality is not None:
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(jpeg_quality))
        pil = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.uint8).copy()
