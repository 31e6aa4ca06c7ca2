"""The tabletop gymnasium env: LIBERO-style 7-D delta end-effector actions, RGB + proprio.

Action (Box(-1, 1, (7,))): [dx, dy, dz, droll, dpitch, dyaw, gripper]. Position deltas are
scaled by ``max_delta`` metres per step; yaw by ``max_rot`` radians (roll and pitch are
ignored: the gripper always points down); gripper > 0 closes, <= 0 opens (LIBERO: -1 open,
+1 close). Closing the fingers around a cube attaches it to the hand until they open: a
kinematic grasp, which keeps this CPU suite fast and deterministic (LIBERO's own robot does
contact-rich grasping).

Observation: ``image`` uint8 [H, W, 3] (agent view, row 0 at the top), ``wrist_image`` if
``wrist=True``, ``state`` float32 [8]: grasp-point position normalised to [-1, 1] over the
workspace (3), sin and cos of the yaw (2), finger opening in [0, 1] (1), whether a cube is
held (1), the last gripper command (1).

``split`` chooses the layouts ``reset`` draws from (``options={"init_state": k}`` picks layout k, no
option a random one): "fixed", the task's fixed initial states; "open", the open stream of training
layouts (any k in [0, 2**62): a fresh scene per index); or "heldout", layouts reserved for evaluation
(see ``tasks``). The reset info names the split.
"""
from __future__ import annotations

import atexit
import math

import gymnasium as gym
import numpy as np

from . import tasks as T
from .scene import CLOSED_WIDTH, CUBE_HALF, CUBES, EMPTY_WIDTH, OPEN_WIDTH, WORKSPACE_HIGH, WORKSPACE_LOW, ZONES, scene_xml

STATE_DIM = 8
SUBSTEPS = 20              # 20 x 5 ms physics per control step (10 Hz control, like LIBERO's 20 Hz order)
GRASP_XY_TOL = 0.022
GRASP_Z_TOL = 0.02

_MODEL_CACHE: dict = {}
_RENDERERS: dict = {}


def _model():
    import mujoco
    if "model" not in _MODEL_CACHE:
        _MODEL_CACHE["model"] = mujoco.MjModel.from_xml_string(scene_xml())
    return _MODEL_CACHE["model"]


def _renderer(height: int, width: int):
    """One renderer (GL context) per image size per process, shared by every env: the model
    is identical for all tasks, only MjData differs."""
    import mujoco
    key = (height, width)
    r = _RENDERERS.get(key)
    if r is None:
        r = mujoco.Renderer(_model(), height, width)
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                     mujoco.mjtRndFlag.mjRND_SKYBOX, mujoco.mjtRndFlag.mjRND_FOG, mujoco.mjtRndFlag.mjRND_HAZE):
            r.scene.flags[flag] = 0
        if not _RENDERERS:
            # registered after mujoco's EGL module registered its own eglTerminate, so this
            # runs first (atexit is last-in, first-out) and contexts are freed while valid
            atexit.register(_close_renderers)
        _RENDERERS[key] = r
    return r


def _close_renderers() -> None:
    while _RENDERERS:
        _, r = _RENDERERS.popitem()
        try:
            r.close()
        except Exception:
            # the GL library was shut down first (another backend's exit hook, e.g. robosuite's eglTerminate
            # registered after this one): nothing is left to free, and neither the renderer's __del__ nor its
            # context's must try again and print an error at interpreter exit
            ctx = getattr(r, "_gl_context", None)
            if ctx is not None and hasattr(ctx, "_context"):
                ctx._context = None
            r._gl_context = None


def _yaw_quat(yaw: float) -> np.ndarray:
    return np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])


class TabletopEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task: T.TaskSpec, *, image_size: int = 64, wrist: bool = False, reward: str = "dense",
                 shaping_coef: float = 1.0, max_delta: float = 0.04, max_rot: float = 0.2,
                 max_episode_steps: int | None = None, seed: int | None = None, demo_layouts: int = 0,
                 split: str = "fixed"):
        from ..render import select_backend
        if not 16 <= image_size <= 1024:
            raise ValueError(f"image_size must be in [16, 1024]; got {image_size}")
        if reward not in ("dense", "sparse"):
            raise ValueError(f"reward must be 'dense' or 'sparse'; got {reward!r}")
        T.check_split(split)
        select_backend()
        import mujoco
        self._mj = mujoco
        self.task = task
        self.image_size, self.wrist, self.reward_type = image_size, wrist, reward
        self.shaping_coef, self.max_delta, self.max_rot = shaping_coef, max_delta, max_rot
        self.max_episode_steps = max_episode_steps or task.max_episode_steps
        self.model = _model()
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._cube_qadr = {c: m.jnt_qposadr[m.joint(f"{c}_joint").id] for c in CUBES}
        self._cube_vadr = {c: m.jnt_dofadr[m.joint(f"{c}_joint").id] for c in CUBES}
        mocap = lambda name: int(m.body_mocapid[m.body(name).id])  # noqa: E731
        self._zone_mid = {z: mocap(f"zone_{z}") for z in ZONES}
        self._hand, self._fl, self._fr = mocap("hand"), mocap("finger_left"), mocap("finger_right")
        # demo_layouts > num_init_states widens the set for recording demonstrations only
        self.split = split
        if split == "open":
            if demo_layouts:
                raise ValueError("demo_layouts widens the fixed split; the open split already offers every layout")
            self._init_states = None
        else:
            self._init_states = T.split_layouts(task, split, demo_layouts)
        self._lo, self._hi = np.array(WORKSPACE_LOW), np.array(WORKSPACE_HIGH)
        self._lo[2] = CUBE_HALF
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        img = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        spaces = {"image": img, "state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)}
        if wrist:
            spaces["wrist_image"] = img
        self.observation_space = gym.spaces.Dict(spaces)
        self._closed = False
        self.init_state = 0
        self._reset_internal(0)
        if seed is not None:
            self.reset(seed=seed)

    # ---- state ----------------------------------------------------------------------------
    @property
    def instruction(self) -> str:
        return self.task.instruction

    def _cube_pos(self, c: str) -> np.ndarray:
        a = self._cube_qadr[c]
        return self.data.qpos[a:a + 3].copy()

    def _sim_state(self) -> dict:
        return {"cubes": {c: self._cube_pos(c) for c in CUBES}, "tip": self.grasp.copy(), "held": self.held,
                "zones": self._zones}

    def _set_gripper_mocap(self, grasp: np.ndarray, yaw: float, width: float) -> None:
        d = self.data
        hand = grasp - np.array([0.0, 0.0, CUBE_HALF])   # finger bottoms at the grasp point's cube bottom
        q = _yaw_quat(yaw)
        side = np.array([-math.sin(yaw), math.cos(yaw), 0.0]) * (width / 2)
        d.mocap_pos[self._hand], d.mocap_quat[self._hand] = hand, q
        d.mocap_pos[self._fl], d.mocap_quat[self._fl] = hand + side, q
        d.mocap_pos[self._fr], d.mocap_quat[self._fr] = hand - side, q

    def _carry(self) -> None:
        if self.held is None:
            return
        a, v = self._cube_qadr[self.held], self._cube_vadr[self.held]
        self.data.qpos[a:a + 3] = self.grasp
        self.data.qvel[v:v + 6] = 0.0

    def _reset_internal(self, k: int) -> None:
        mj, d = self._mj, self.data
        mj.mj_resetData(self.model, d)
        s = T.open_layout(self.task, k) if self._init_states is None else self._init_states[k]
        self.init_state = k
        self._zones = {z: np.array([*s["zones"][z], 0.0]) for z in ZONES}
        for z, mid in self._zone_mid.items():
            d.mocap_pos[mid] = [*s["zones"][z], 0.0005]
        for c in CUBES:
            a = self._cube_qadr[c]
            d.qpos[a:a + 3] = [*s["cubes"][c], CUBE_HALF]
            d.qpos[a + 3:a + 7] = _yaw_quat(s["cube_yaw"][c])
        self.grasp = np.array(s["hand"], dtype=np.float64)
        self.yaw, self.width, self.held, self.gripper_cmd = 0.0, OPEN_WIDTH, None, -1.0
        self._set_gripper_mocap(self.grasp, self.yaw, self.width)
        mj.mj_forward(self.model, d)
        self._start = self._sim_state()
        self.stage = 0
        self._advance_stage()
        self._potential = T.progress(self.task, self._start, self._start, self.stage)
        self.elapsed = 0

    def _advance_stage(self) -> None:
        s = self._sim_state()
        while self.stage < len(self.task.steps) and T.step_done(self.task.steps[self.stage], s):
            self.stage += 1

    # ---- observation ----------------------------------------------------------------------
    def _render(self, camera: str) -> np.ndarray:
        r = _renderer(self.image_size, self.image_size)
        r.update_scene(self.data, camera)
        return r.render()

    def _obs(self) -> dict:
        g = 2 * (self.grasp - self._lo) / (self._hi - self._lo) - 1
        state = np.array([*g, math.sin(self.yaw), math.cos(self.yaw),
                          (self.width - EMPTY_WIDTH) / (OPEN_WIDTH - EMPTY_WIDTH), float(self.held is not None),
                          self.gripper_cmd], dtype=np.float32)
        obs = {"image": self._render("agentview"), "state": state}
        if self.wrist:
            obs["wrist_image"] = self._render("wrist")
        return obs

    def render(self) -> np.ndarray:
        return self._render("agentview")

    # ---- gymnasium API --------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        k = (options or {}).get("init_state")
        n = T.split_size(self.task, self.split) if self._init_states is None else len(self._init_states)
        if k is None:
            k = int(self.np_random.integers(n))
        elif not 0 <= int(k) < n:
            raise ValueError(f"init_state must be in [0, {n}) on the {self.split} split; got {k}")
        self._reset_internal(int(k))
        return self._obs(), {"instruction": self.instruction, "task_id": self.task.task_id, "init_state": int(k),
                              "split": self.split}

    def step(self, action):
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (7,):
            raise ValueError(f"action must have shape (7,) = [dx, dy, dz, droll, dpitch, dyaw, gripper] in [-1, 1]; "
                             f"got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"action contains NaN or inf: {a}")
        a = np.clip(a, -1.0, 1.0)
        mj, d = self._mj, self.data
        start_grasp, start_yaw, start_width = self.grasp.copy(), self.yaw, self.width
        goal = np.clip(self.grasp + self.max_delta * a[:3], self._lo, self._hi)
        goal_yaw = float(np.clip(self.yaw + self.max_rot * a[5], -math.pi / 2, math.pi / 2))
        was_open = self.gripper_cmd < 0
        self.gripper_cmd = 1.0 if a[6] > 0 else -1.0
        if self.gripper_cmd < 0:
            self.held = None
        elif self.held is None and was_open:
            # only the closing motion can take a cube: already-closed fingers push instead
            for c in CUBES:
                diff = self._cube_pos(c) - self.grasp
                if np.abs(diff[:2]).max() < GRASP_XY_TOL and abs(diff[2]) < GRASP_Z_TOL:
                    self.held = c
                    break
        goal_width = OPEN_WIDTH if self.gripper_cmd < 0 else (CLOSED_WIDTH if self.held else EMPTY_WIDTH)
        for i in range(1, SUBSTEPS + 1):
            f = i / SUBSTEPS
            self.grasp = start_grasp + f * (goal - start_grasp)
            self.yaw = start_yaw + f * (goal_yaw - start_yaw)
            self.width = start_width + f * (goal_width - start_width)
            self._set_gripper_mocap(self.grasp, self.yaw, self.width)
            self._carry()
            mj.mj_step(self.model, d)
        self._carry()
        mj.mj_forward(self.model, d)
        self.elapsed += 1
        self._advance_stage()
        s = self._sim_state()
        success = T.success(self.task, s)
        potential = T.progress(self.task, s, self._start, self.stage)
        reward = float(success)
        if self.reward_type == "dense":
            reward += self.shaping_coef * (potential - self._potential)
        self._potential = potential
        truncated = (not success) and self.elapsed >= self.max_episode_steps
        info = {"success": success, "progress": potential, "stage": self.stage}
        return self._obs(), reward, success, truncated, info

    def close(self) -> None:
        self._closed = True   # the shared renderers are freed at exit
