"""Trajectories the reward model learns from, and the files they are kept in.

An episode is a dict (``collect_demos``' layout):

    images       uint8 [T, H, W, 3]   the observation before each action (what the policy saw)
    states       float32 [T, D]       proprio; its first 3 entries are the end effector's position
    actions      float32 [T, 7]       the actions executed, env convention (gripper: -1 open, +1 close)
    instruction  str
    success      bool                 the episode ended in the task's success
    task_id      str                  optional
    ee_pos       float32 [T, 3]       optional: the end effector's position, where ``states`` does not start with it

Saved episodes are ``.npz`` files (``numpy.savez_compressed``) of those keys, one per episode, in a
directory; ``vlarl-fast prm --data.episodes DIR`` reads every ``*.npz`` in it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

REQUIRED = ("images", "states", "actions", "instruction", "success")


def check_episode(ep: dict, where: str = "episode") -> dict:
    """The episode with its arrays in the documented dtypes; a clear error naming what is wrong."""
    missing = [k for k in REQUIRED if k not in ep]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (an episode file holds {', '.join(REQUIRED)}; "
                         "see vlarl_fast.prm.episodes)")
    images = np.asarray(ep["images"])
    T = len(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 [T, H, W, 3]; got {images.dtype} {images.shape}")
    states = np.asarray(ep["states"], dtype=np.float32)
    actions = np.asarray(ep["actions"], dtype=np.float32)
    ee = np.asarray(ep["ee_pos"], dtype=np.float32) if "ee_pos" in ep else states[:, :3] if states.ndim == 2 else None
    for name, a, width in (("states", states, None), ("actions", actions, 7), ("ee_pos", ee, 3)):
        if a is None or a.ndim != 2 or len(a) != T or (width is not None and a.shape[1] != width):
            raise ValueError(f"{where}: {name} must be [{T}, {width or 'D'}] (one row per image); got "
                             f"{None if a is None else a.shape}")
    if T < 2:
        raise ValueError(f"{where}: {T} frames; an episode needs at least 2")
    out = dict(ep, images=images, states=states, actions=actions, ee_pos=ee, success=bool(ep["success"]),
               instruction=str(ep["instruction"]))
    return out


def save_episode(path: str | Path, ep: dict) -> Path:
    ep = check_episode(ep, str(path))
    path = Path(path)
    keys = REQUIRED + ("ee_pos", "task_id")
    np.savez_compressed(path, **{k: np.asarray(ep[k]) for k in keys if k in ep})
    return path


def save_episodes(directory: str | Path, episodes: list[dict]) -> list[Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return [save_episode(d / f"episode_{i:05d}.npz", ep) for i, ep in enumerate(episodes)]


def load_episodes(directory: str | Path) -> list[dict]:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"--data.episodes {str(d)!r} is not a directory of episode files (*.npz)")
    files = sorted(d.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"--data.episodes {str(d)!r} holds no *.npz episode files")
    out = []
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            ep = {k: z[k] for k in z.files}
        for k in ("instruction", "task_id"):
            if k in ep:
                ep[k] = str(ep[k])
        out.append(check_episode(ep, str(f)))
    return out


def expert_episodes(tasks: list[str], per_task: int, noise_levels: tuple[float, ...], layouts: int, seed: int,
                    image_size: int, progress=None) -> list[dict]:
    """The scripted expert's episodes, failures kept, dealt over the noise levels: with large motion noise the
    expert often fails, which gives the negatives near success that the reward model must tell apart."""
    from ..envs.tabletop.expert import collect_demos
    if not noise_levels:
        raise ValueError("--data.expert-noise needs at least one noise level")
    out = []
    for j, noise in enumerate(noise_levels):
        n = per_task // len(noise_levels) + (j < per_task % len(noise_levels))
        if n:
            out += collect_demos(tasks, n, noise=noise, seed=seed + 1009 * j, image_size=image_size,
                                 only_success=False, clean_labels=False, layouts=layouts, progress=progress)
    return [check_episode(ep) for ep in out]


def policy_episodes(policy, tasks: list[str], per_task: int, *, split: str, num_envs: int, image_size: int | None,
                    seed: int, temperature: float, env_options: dict | None = None, backend: str = "inprocess",
                    render_device: str = "auto", progress=None) -> list[dict]:
    """A policy's own rollouts, failures too, on a training split: one episode per layout of the tabletop's open
    stream, or episodes dealt over the fixed initial states (LIBERO)."""
    from ..envs.registry import TRAINING_SPLITS, get_task
    from ..rl.evaluate import evaluate
    if split not in TRAINING_SPLITS:
        raise ValueError(f"split {split!r} is reserved for evaluation; the reward model learns from "
                         f"{' or '.join(TRAINING_SPLITS)}")
    kw = dict(init_states=per_task, episodes_per_state=1) if split == "open" else \
        dict(init_states=0, episodes_per_state=1, episodes_per_task=per_task)
    res = evaluate(policy, tasks, num_envs=num_envs, image_size=image_size, seed=seed, greedy=False,
                   temperature=temperature, progress=progress, env_options=env_options, record=per_task,
                   backend=backend, render_device=render_device, split=split, **kw)
    out = []
    for t, eps in res["videos"].items():
        for e in eps:
            out.append(check_episode({"images": e["frames"], "states": e["states"], "actions": e["actions"],
                                      "instruction": get_task(t).instruction, "task_id": t, "success": e["success"],
                                      "init_state": e["init_state"]}))
    return out
