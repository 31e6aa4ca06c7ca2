"""Automatic task segmentation: the keyframes that end sub-tasks in a trajectory.

VLA-RL extracts its pseudo labels from two kinds of events, both visible in any robot log: the gripper
opening or closing (a grasp or a release ends a sub-task), and the end effector coming to rest (a reach
or a placement ends where the arm stops). Frame ``t`` is the observation before action ``t``; a keyframe
is the first frame that shows the event's outcome.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SegmentConfig:
    gripper_threshold: float = 0.0
    """A gripper command above this counts as closed (the env convention: -1 open, +1 close)."""
    velocity_threshold: float = 0.15
    """The end effector is at rest where its speed per step is below this share of the episode's peak speed."""
    min_gap: int = 3
    """Keyframes fewer than this many frames after the previous one merge into it."""


def gripper_events(gripper: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Frames right after the gripper command changed state: action ``t`` differs from action ``t - 1``, so
    frame ``t + 1`` is the first to show the grasp or the release."""
    closed = np.asarray(gripper, dtype=np.float64) > threshold
    changed = np.flatnonzero(closed[1:] != closed[:-1]) + 1
    return np.minimum(changed + 1, len(closed) - 1) if len(closed) else changed


def rest_onsets(ee_pos: np.ndarray, threshold: float = 0.15) -> np.ndarray:
    """Frames where the end effector comes to rest: the first frame of each run of steps whose motion
    ``|ee[t + 1] - ee[t]|`` is below ``threshold`` x the peak motion, after a step that moved. A trajectory
    that never moves has no rest onsets."""
    ee = np.asarray(ee_pos, dtype=np.float64)
    if ee.ndim != 2 or len(ee) < 3:
        return np.zeros(0, dtype=np.int64)
    speed = np.linalg.norm(np.diff(ee, axis=0), axis=1)   # speed[t]: the motion of action t
    peak = speed.max()
    if peak <= 0:
        return np.zeros(0, dtype=np.int64)
    still = speed < threshold * peak
    return np.flatnonzero(still[1:] & ~still[:-1]) + 1


def merge_close(frames: np.ndarray, min_gap: int) -> np.ndarray:
    """Sorted unique frames, each kept only if at least ``min_gap`` frames after the last one kept."""
    kept: list[int] = []
    for f in np.unique(np.asarray(frames, dtype=np.int64)):
        if not kept or f - kept[-1] >= min_gap:
            kept.append(int(f))
    return np.array(kept, dtype=np.int64)


def keyframes(gripper: np.ndarray, ee_pos: np.ndarray, cfg: SegmentConfig = SegmentConfig()) -> np.ndarray:
    """The frames that end a segment: gripper events and rest onsets, merged when close."""
    if len(gripper) != len(ee_pos):
        raise ValueError(f"{len(gripper)} gripper commands but {len(ee_pos)} end-effector positions: one per frame")
    if cfg.min_gap < 1:
        raise ValueError(f"--segment.min-gap must be >= 1; got {cfg.min_gap}")
    if not 0 < cfg.velocity_threshold < 1:
        raise ValueError(f"--segment.velocity-threshold is a share of the peak speed in (0, 1); got "
                         f"{cfg.velocity_threshold}")
    events = np.concatenate([gripper_events(gripper, cfg.gripper_threshold),
                             rest_onsets(ee_pos, cfg.velocity_threshold)])
    return merge_close(events, cfg.min_gap)
