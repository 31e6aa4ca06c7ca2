"""One LIBERO task as a gymnasium env, with the observations and episode rules of the VLA papers.

Wraps LIBERO's own ``OffScreenRenderEnv`` (robosuite 1.4, Panda arm, OSC_POSE controller, 20 Hz):

- action Box(-1, 1, (7,)): [dx, dy, dz, droll, dpitch, dyaw, gripper], LIBERO's delta end-effector
  command; gripper -1 opens, +1 closes. Out-of-range values are clipped, a wrong shape or NaN raises.
- observation: ``image`` (agent view) and, with ``wrist=True``, ``wrist_image`` (eye in hand), rendered at
  ``render_size`` (256, as LIBERO's evaluations render) and delivered by :func:`images.to_policy_image`
  (rotated 180 degrees, optional centre crop, resized to ``image_size``, 224 by default); ``state`` float32
  [8]: end-effector position (3), its orientation as axis-angle (3), the two finger joint positions (2),
  the proprio vector of OpenVLA-OFT and VLA-RL.
- reset: a hard reset of the sim (LIBERO's default), then one of the benchmark's fixed initial states
  (``options={"init_state": k}``, otherwise drawn from the env's seeded generator), then ``settle_steps``
  no-op actions (gripper open) while the objects come to rest, as OpenVLA's evaluation does; they do not
  count toward the episode's steps.
- reward 1.0 on the step that reaches the goal (LIBERO's sparse success predicate from the BDDL goal),
  else 0; ``terminated`` on success; ``truncated`` at the suite's step limit.

LIBERO places fixtures (cabinets, stoves, racks) at reset with numpy's global generator, and the initial
states do not cover them (they sit in the model, not in qpos). The adapter seeds that generator with the
initial state's index around the reset and restores it afterwards: ``(task, init_state)`` then names one
scene on every machine, and the caller's global generator is left alone.
"""
from __future__ import annotations

import atexit
import math
import weakref

import gymnasium as gym
import numpy as np

from .bootstrap import use_assets
from .images import check_options, to_policy_image
from .suites import LiberoTask, load_init_states

STATE_DIM = 8
NOOP = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
CAMERAS = {"image": "agentview", "wrist_image": "robot0_eye_in_hand"}

_LIVE: "weakref.WeakSet[LiberoEnv]" = weakref.WeakSet()
_atexit_registered = False


def _close_live() -> None:
    for env in list(_LIVE):
        env.close()


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """robosuite's (x, y, z, w) quaternion -> axis * angle, as OpenVLA's LIBERO code computes it."""
    q = np.asarray(quat, dtype=np.float64)
    w = min(max(float(q[3]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * math.acos(w) / den


def proprio(raw: dict) -> np.ndarray:
    return np.concatenate([raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"]),
                           raw["robot0_gripper_qpos"]]).astype(np.float32)


class LiberoEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task: LiberoTask, *, image_size: int = 224, render_size: int = 256, wrist: bool = False,
                 center_crop: float | None = None, jpeg_quality: int | None = None, settle_steps: int = 10,
                 max_episode_steps: int | None = None, hard_reset: bool = True, reward: str = "sparse",
                 assets: str | None = None, render_gpu_device_id: int = -1, seed: int | None = None):
        check_options(image_size, center_crop, jpeg_quality)
        if not 16 <= int(render_size) <= 2048:
            raise ValueError(f"render_size must be in [16, 2048] (LIBERO's evaluations render at 256); "
                             f"got {render_size}")
        if int(settle_steps) < 0:
            raise ValueError(f"settle_steps must be >= 0 (OpenVLA's evaluation waits 10); got {settle_steps}")
        if max_episode_steps is not None and int(max_episode_steps) < 1:
            raise ValueError(f"max_episode_steps must be >= 1; got {max_episode_steps}")
        if reward != "sparse":
            raise ValueError(f"LIBERO has only the sparse success reward: use reward='sparse' (got {reward!r}); "
                             "add process rewards on the training side")
        from ..render import select_backend
        select_backend()  # robosuite picks its GL context class from MUJOCO_GL when first imported
        self.assets = use_assets(assets)
        from libero.libero.envs import OffScreenRenderEnv

        self.task = task
        self.image_size, self.render_size, self.wrist = int(image_size), int(render_size), bool(wrist)
        self.center_crop, self.jpeg_quality = center_crop, jpeg_quality
        self.settle_steps = int(settle_steps)
        self.max_episode_steps = int(max_episode_steps or task.max_episode_steps)
        self._init_states = load_init_states(task.suite, task.name)
        self._keys = ["image"] + (["wrist_image"] if self.wrist else [])
        self._env = None
        self._env = OffScreenRenderEnv(
            bddl_file_name=task.bddl_file, camera_names=[CAMERAS[k] for k in self._keys],
            camera_heights=self.render_size, camera_widths=self.render_size, hard_reset=hard_reset,
            # episode limits are the adapter's: robosuite's own horizon would refuse steps after 1000
            ignore_done=True, render_gpu_device_id=render_gpu_device_id)
        global _atexit_registered
        _LIVE.add(self)
        if not _atexit_registered:
            # registered after robosuite's EGL module registered eglTerminate (at its first context), so
            # this runs first (atexit is last-in, first-out) and contexts are freed while the display lives
            atexit.register(_close_live)
            _atexit_registered = True
        # the constructor built a fresh sim: the first reset may skip rebuilding it (same state bit for bit)
        self._fresh = True
        img = gym.spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        spaces = {k: img for k in self._keys}
        spaces["state"] = gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        self.init_state = 0
        self.elapsed = 0
        self._raw: dict | None = None
        if seed is not None:
            self.reset(seed=seed)

    # ---- facts --------------------------------------------------------------------------------
    @property
    def instruction(self) -> str:
        return self.task.instruction

    @property
    def num_init_states(self) -> int:
        return len(self._init_states)

    @property
    def libero_env(self):
        """LIBERO's own ``OffScreenRenderEnv`` underneath (its ``.env`` is the robosuite env)."""
        return self._env

    def check_success(self) -> bool:
        return bool(self._env.check_success())

    # ---- observation ----------------------------------------------------------------------------
    def _obs(self, raw: dict) -> dict:
        self._raw = raw
        obs = {k: to_policy_image(raw[CAMERAS[k] + "_image"], self.image_size, center_crop=self.center_crop,
                                  jpeg_quality=self.jpeg_quality) for k in self._keys}
        obs["state"] = proprio(raw)
        return obs

    def render(self) -> np.ndarray:
        """The agent view upright at render size (for videos), without crop or resize."""
        if self._raw is None:
            raise RuntimeError("call reset() before render()")
        return np.ascontiguousarray(self._raw["agentview_image"][::-1, ::-1])

    # ---- gymnasium API ----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self._env is None:
            raise RuntimeError("this LiberoEnv is closed")
        k = (options or {}).get("init_state")
        if k is None:
            k = int(self.np_random.integers(self.num_init_states))
        elif not 0 <= int(k) < self.num_init_states:
            raise ValueError(f"init_state must be in [0, {self.num_init_states}) for {self.task.task_id}; got {k}")
        k = int(k)
        saved = np.random.get_state()
        try:
            np.random.seed(k)
            if self._fresh:
                inner = self._env.env
                hard, inner.hard_reset = inner.hard_reset, False
                try:
                    self._env.reset()
                finally:
                    inner.hard_reset = hard
                self._fresh = False
            else:
                self._env.reset()
            raw = self._env.set_init_state(self._init_states[k])
        finally:
            np.random.set_state(saved)
        for _ in range(self.settle_steps):
            raw, _, _, _ = self._env.step(NOOP)
        self.init_state, self.elapsed = k, 0
        return self._obs(raw), {"instruction": self.instruction, "task_id": self.task.task_id, "init_state": k}

    def step(self, action):
        if self._raw is None:
            raise RuntimeError("call reset() before step()")
        a = np.array(action, dtype=np.float64)  # a copy: the caller's buffer may be reused (shared memory)
        if a.shape != (7,):
            raise ValueError(f"action must have shape (7,) = [dx, dy, dz, droll, dpitch, dyaw, gripper] in [-1, 1]; "
                             f"got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"action contains NaN or inf: {a}")
        np.clip(a, -1.0, 1.0, out=a)
        raw, _, done, _ = self._env.step(a)
        self.elapsed += 1
        success = bool(done)  # LIBERO's step returns its success predicate as `done`
        truncated = (not success) and self.elapsed >= self.max_episode_steps
        return self._obs(raw), float(success), success, truncated, {"success": success}

    def close(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            _LIVE.discard(self)
            try:
                env.close()
            except Exception:  # a half-built env (constructor failed) has nothing to free
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
