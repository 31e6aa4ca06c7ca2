"""Pseudo labels per frame from the segments, for the reward model's "is it completed?" question.

A frame of a successful episode near a keyframe (a sub-task just ended) or among its last frames (the
task is done) is a positive; every frame of a failed episode is a negative. The other frames of
successful episodes are ignored by default: they lie between sub-task ends and are neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1


@dataclass
class LabelConfig:
    window: int = 1
    """Frames of a successful episode within this many frames of a keyframe count as progress."""
    final_frames: int = 3
    """The last frames of a successful episode count as progress (the task is done there)."""
    rest: Literal["ignore", "negative"] = "ignore"
    """The other frames of successful episodes: left out of training, or negatives."""


def pseudo_labels(n_frames: int, keyframes: np.ndarray, success: bool, cfg: LabelConfig = LabelConfig()) -> np.ndarray:
    """int8 [n_frames]: POSITIVE, NEGATIVE or IGNORE."""
    if cfg.window < 0 or cfg.final_frames < 1:
        raise ValueError(f"--labels.window must be >= 0 and --labels.final-frames >= 1; got {cfg.window} and "
                         f"{cfg.final_frames}")
    if cfg.rest not in ("ignore", "negative"):
        raise ValueError(f"--labels.rest must be 'ignore' or 'negative'; got {cfg.rest!r}")
    if not success:
        return np.full(n_frames, NEGATIVE, dtype=np.int8)
    labels = np.full(n_frames, IGNORE if cfg.rest == "ignore" else NEGATIVE, dtype=np.int8)
    for k in np.asarray(keyframes, dtype=np.int64):
        labels[max(0, k - cfg.window):k + cfg.window + 1] = POSITIVE
    labels[max(0, n_frames - cfg.final_frames):] = POSITIVE
    return labels
