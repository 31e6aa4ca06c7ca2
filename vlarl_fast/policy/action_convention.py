"""Action conventions: how a policy's decoded actions become the environment's actions, and back.

A policy emits actions in the convention of the data it was trained on; the envs here take LIBERO's:
``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` with gripper -1 = open, +1 = close (the tabletop suite too).

- ``identity``: decoded actions are env actions (the tiny VLA, checkpoints trained here from the envs' own
  demonstrations, OpenVLA checkpoints of other datasets).
- ``libero-openvla``: OpenVLA's LIBERO fine-tunes. Their data (the ``libero_*_no_noops`` RLDS sets) stores the
  gripper as 0 = close, 1 = open, and the gripper dimension is not normalised (its statistics mask is False),
  so it decodes in [0, 1]. OpenVLA's LIBERO evaluation turns it into a LIBERO command with
  ``normalize_gripper_action(a, binarize=True)`` (``g -> sign(2 g - 1)``) then ``invert_gripper_action``
  (``g -> -g``): 0 -> +1 (close), 1 -> -1 (open).

The convention is applied after un-normalisation (``to_env``) and undone before normalisation
(``from_env``), so demonstrations recorded in env units become the tokens the policy would emit for them.
"""
from __future__ import annotations

import numpy as np
import torch

IDENTITY = "identity"
LIBERO_OPENVLA = "libero-openvla"
CONVENTIONS = (IDENTITY, LIBERO_OPENVLA)
AUTO = "auto"   # a checkpoint's recorded convention, else the one its statistics key implies
RECORD_KEY = "action_convention"   # the key a checkpoint saved here records it under (OpenVLA's: vlarl_ prefixed)


class ActionConventionError(ValueError):
    pass


def check_convention(name: str, *, allow_auto: bool = False) -> str:
    known = ((AUTO,) if allow_auto else ()) + CONVENTIONS
    if name not in known:
        raise ActionConventionError(f"unknown action convention {name!r}; use one of {', '.join(known)}")
    return name


def infer_convention(unnorm_key: str | None) -> str:
    """The convention a checkpoint's action statistics key implies: OpenVLA names its LIBERO datasets
    ``libero_spatial_no_noops``, ``libero_10_no_noops``..., and only those flip the gripper."""
    return LIBERO_OPENVLA if unnorm_key is not None and unnorm_key.lower().startswith("libero") else IDENTITY


def resolve_convention(requested: str, *, recorded: str | None, unnorm_key: str | None,
                       source: str | None = None, key: str = RECORD_KEY) -> str:
    """An explicit request wins; 'auto' takes what the checkpoint recorded (one saved here), else infers from
    the statistics key (a checkpoint from elsewhere). Recorded beats inferred, so a checkpoint trained here
    with a convention chosen by hand keeps it when loaded again. ``source`` and ``key`` (the file and key the
    recorded value was read from) go into the error about a bad recorded value."""
    check_convention(requested, allow_auto=True)
    if requested != AUTO:
        return requested
    if recorded is not None:
        try:
            return check_convention(recorded)
        except ActionConventionError as e:
            where = f" ({source} records {recorded!r} under {key})" if source else ""
            raise ActionConventionError(f"{e}{where}") from None
    return infer_convention(unnorm_key)


def _with_last(actions, last):
    if isinstance(actions, torch.Tensor):
        return torch.cat([actions[..., :-1], last], -1)
    return np.concatenate([actions[..., :-1], last], -1).astype(np.float32)


def to_env(actions, convention: str):
    """Decoded, un-normalised actions [..., 7] (numpy or torch) -> env actions. The gripper is the last
    dimension, as in OpenVLA's ``normalize_gripper_action`` / ``invert_gripper_action``."""
    check_convention(convention)
    if convention == IDENTITY:
        return actions
    g = actions[..., -1:]
    sign = torch.sign if isinstance(actions, torch.Tensor) else np.sign
    return _with_last(actions, -sign(2.0 * g - 1.0))


def from_env(actions, convention: str):
    """Env actions [..., 7] -> the policy's convention; ``to_env(from_env(a))`` gives ``a`` back for grippers
    in {-1, 0, +1}, and the sign of any other gripper value (the envs read only its sign)."""
    check_convention(convention)
    if convention == IDENTITY:
        return actions
    a = actions if isinstance(actions, torch.Tensor) else np.asarray(actions, dtype=np.float32)
    g = a[..., -1:].clip(-1.0, 1.0)
    return _with_last(a, (1.0 - g) / 2.0)
