"""Scripted experts (privileged simulator state) and demonstration collection.

Each sub-goal is a small state machine over the grasp point; the expert emits the same 7-D
normalised action a policy would, optionally with Gaussian noise on the motion part.
Demonstrations execute the noisy action but, by default, record the expert's intended (clean)
action as the label (DART, Laskey et al. 2017): the data then covers the states a drifting
policy visits, with the corrective action for each.
"""
from __future__ import annotations

import numpy as np

from .scene import CUBE_HALF, FINGER_HALF
from .tasks import Step, on_zone

HOVER = 0.07      # clearance above a cube while travelling
CARRY_Z = 0.10


class ScriptedExpert:
    def __init__(self, env, noise: float = 0.0, rng: np.random.Generator | None = None):
        self.env = env.unwrapped
        self.noise = noise
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def _move(self, target: np.ndarray) -> np.ndarray:
        return np.clip((target - self.env.grasp) / self.env.max_delta, -1.0, 1.0)

    def _approach(self, cube: np.ndarray, grip_when_there: float):
        """Travel at hover height until above the cube, then descend onto it (open)."""
        g = self.env.grasp
        xy_err = np.linalg.norm(cube[:2] - g[:2])
        z_err = g[2] - cube[2]
        if xy_err > 0.025 and z_err > 0.015:
            z = max(cube[2] + HOVER, g[2]) if xy_err > 0.05 else cube[2] + HOVER
            return self._move(np.array([cube[0], cube[1], z])), -1.0, False
        if xy_err > 0.025:   # low and off target: rise while correcting
            return self._move(np.array([cube[0], cube[1], cube[2] + HOVER])), -1.0, False
        if xy_err > 0.012 or z_err > 0.012:
            return self._move(cube), -1.0, False
        return np.zeros(3), grip_when_there, True

    def _step_action(self, step: Step) -> tuple[np.ndarray, float]:
        e = self.env
        cube = e._cube_pos(step.cube)
        g = e.grasp
        if step.kind == "reach":
            move, grip, _ = self._approach(cube, -1.0)
            return move, grip
        if step.kind == "lift":
            if e.held == step.cube:
                return self._move(np.array([cube[0], cube[1], 0.14])), 1.0
            move, grip, _ = self._approach(cube, 1.0)
            return move, grip
        zone = e._zones[step.zone]
        if step.kind == "place":
            if e.held == step.cube:
                xy_err = np.linalg.norm(zone[:2] - g[:2])
                if xy_err > 0.012:
                    z = max(CARRY_Z, g[2]) if xy_err > 0.03 else CARRY_Z
                    return self._move(np.array([zone[0], zone[1], z])), 1.0
                if g[2] > CUBE_HALF + 0.012:
                    return self._move(np.array([zone[0], zone[1], CUBE_HALF + 0.005])), 1.0
                return np.zeros(3), -1.0
            if on_zone(cube, zone) and e.held is None:
                return self._move(np.array([g[0], g[1], CARRY_Z])), -1.0
            move, grip, _ = self._approach(cube, 1.0)
            return move, grip
        # push: closed fingers stand behind the cube on the line to the zone centre, then drive
        u = zone[:2] - cube[:2]
        dist = np.linalg.norm(u)
        u = u / max(dist, 1e-6)
        reach_out = CUBE_HALF + abs(u[0]) * FINGER_HALF[0] + abs(u[1]) * 2 * FINGER_HALF[1] + 0.004
        contact = cube[:2] - u * reach_out
        off = np.linalg.norm(g[:2] - contact)
        low = CUBE_HALF
        if g[2] > low + 0.01:  # high: travel above the contact point, then descend
            if off > 0.01:
                return self._move(np.array([contact[0], contact[1], max(g[2], 0.07)])), 1.0
            return self._move(np.array([contact[0], contact[1], low])), 1.0
        if off > 0.02:          # low but off the line: lift before re-positioning
            return self._move(np.array([g[0], g[1], 0.08])), 1.0
        target = contact + u * min(dist + 0.01, 0.04)
        return self._move(np.array([target[0], target[1], low])), 1.0

    def act(self, obs=None) -> np.ndarray:
        e = self.env
        steps = e.task.steps
        stage = min(e.stage, len(steps) - 1)
        if e.stage >= len(steps):
            move, grip = np.array([0.0, 0.0, 0.5]), -1.0
        else:
            move, grip = self._step_action(steps[stage])
        a = np.zeros(7)
        a[:3] = move
        a[6] = grip
        self.last_clean = np.clip(a, -1.0, 1.0).astype(np.float32)
        if self.noise > 0:  # on the motion that matters; roll/pitch/yaw stay as commanded
            a[:3] += self.rng.normal(0.0, self.noise, size=3)
        return np.clip(a, -1.0, 1.0).astype(np.float32)


def collect_demos(task_ids: list[str], episodes_per_task: int, noise: float = 0.0, seed: int = 0,
                  image_size: int = 64, only_success: bool = True, progress=None, max_attempts: int = 4,
                  clean_labels: bool = True, layouts: int = 0) -> list[dict]:
    """Run the expert; each episode: images [T,H,W,3] uint8, states [T,8], actions [T,7], instruction,
    task_id, init_state, success. Scenes are dealt round-robin over the task's fixed initial states, or
    over the first ``layouts`` layouts of its seeded stream when that is larger (the initial states come first).
    ``clean_labels``: record the intended action (DART) rather than the executed noisy one."""
    from ..registry import make_training_env

    rng = np.random.default_rng(seed)
    episodes = []
    for task_id in task_ids:
        env = make_training_env(task_id, image_size=image_size, reward="sparse", demo_layouts=layouts)
        expert = ScriptedExpert(env, noise=noise, rng=rng)
        n_states = max(env.unwrapped.task.num_init_states, layouts)
        kept, tries = 0, 0
        while kept < episodes_per_task and tries < max_attempts * episodes_per_task:
            # scene `kept` in turn; after a failed attempt, one 7 scenes further on (a scene the noisy
            # expert fails on is not retried at once)
            k = (kept + 7 * (tries - kept)) % n_states
            tries += 1
            obs, info = env.reset(seed=int(rng.integers(2**31)), options={"init_state": k})
            imgs, states, actions = [], [], []
            success = False
            for _ in range(env.unwrapped.max_episode_steps):
                a = expert.act(obs)
                imgs.append(obs["image"])
                states.append(obs["state"])
                actions.append(expert.last_clean if clean_labels else a)
                obs, _, term, trunc, step_info = env.step(a)
                if term or trunc:
                    success = bool(step_info["success"])
                    break
            if only_success and not success:
                continue
            episodes.append({"images": np.stack(imgs), "states": np.stack(states), "actions": np.stack(actions),
                             "instruction": info["instruction"], "task_id": task_id, "init_state": k,
                             "success": success})
            kept += 1
            if progress is not None:
                progress.update(1)
        env.close()
    return episodes
