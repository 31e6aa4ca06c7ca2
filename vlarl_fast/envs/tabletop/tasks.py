"""Tasks of the tabletop suite: instruction, success predicate, progress potential, init states.

Every task has a fixed set of initial states generated from a per-task constant seed (like
LIBERO's init files), so "task t, initial state k" names the same scene on every machine.
Three splits of layouts per task:

- "fixed": the first ``NUM_INIT_STATES`` layouts of the task's seeded stream (LIBERO's protocol trains and
  evaluates on these); demonstrations may be recorded on more layouts of the same stream;
- "open": the open stream of training layouts, layout ``k`` drawn from its own seed ``(task, k)`` (random
  access, nothing stored), so RL can practise on a fresh scene every episode;
- "heldout": ``HELDOUT_LAYOUTS`` layouts from a third seed, for evaluation only: no demonstration,
  curriculum draw or RL episode is built from them (training envs refuse the split, and an open-stream
  layout equal to a held-out one is redrawn), so success there measures generalisation to unseen scenes.
Progress potentials Phi(state) in [0, 1] give the optional dense reward
``Phi(s') - Phi(s)`` (potential-based shaping with gamma = 1, which leaves the set of optimal
policies unchanged for episodic tasks).
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field

import numpy as np

from .scene import CUBE_HALF, CUBES, ZONE_HALF, ZONES

NUM_INIT_STATES = 20
HELDOUT_LAYOUTS = 100     # held-out layouts per task
OPEN_LAYOUTS = 2 ** 62    # index range of the open training stream (unbounded in practice)
# "fixed": the fixed initial states (training and the standard evaluation); "open": a fresh training layout
# per index; "heldout": evaluation only
SPLITS = ("fixed", "open", "heldout")
REACH_TOL = 0.03          # fingertip centre to cube centre (xy) for "reach"
REACH_Z_TOL = 0.05
LIFT_HEIGHT = 0.08        # cube centre height for "pick up"
SCALE = 0.4               # distances are normalised by this in the potentials


@dataclass(frozen=True)
class Step:
    """One sub-goal: 'reach' a cube, 'lift' it, move it onto a zone by 'push' or 'place'."""

    kind: str
    cube: str
    zone: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    instruction: str
    max_episode_steps: int
    difficulty: int
    steps: tuple[Step, ...] = field(default_factory=tuple)
    num_init_states: int = NUM_INIT_STATES

    @property
    def name(self) -> str:
        return self.task_id.split("/", 1)[1]


TASKS: dict[str, TaskSpec] = {t.task_id: t for t in [
    TaskSpec("tabletop/reach_red", "move the gripper to the red cube", 25, 1, (Step("reach", "red"),)),
    TaskSpec("tabletop/reach_blue", "move the gripper to the blue cube", 25, 1, (Step("reach", "blue"),)),
    TaskSpec("tabletop/lift_green", "pick up the green cube", 40, 2, (Step("lift", "green"),)),
    TaskSpec("tabletop/push_red_to_yellow", "push the red cube onto the yellow square", 50, 2,
             (Step("push", "red", "yellow"),)),
    TaskSpec("tabletop/place_blue_on_purple", "put the blue cube on the purple square", 50, 3,
             (Step("place", "blue", "purple"),)),
    TaskSpec("tabletop/place_two", "put the red cube on the yellow square and then the green cube on the purple square",
             90, 4, (Step("place", "red", "yellow"), Step("place", "green", "purple"))),
]}


# ---- initial states --------------------------------------------------------------------------
def _sample_layout(rng: np.random.Generator) -> dict:
    """Cube and zone positions with minimum separations; gripper starts high and open."""
    for _ in range(1000):
        zones = {z: rng.uniform([-0.14, -0.2], [0.14, 0.2]) for z in ZONES}
        if np.linalg.norm(zones["yellow"] - zones["purple"]) < 2.4 * ZONE_HALF:
            continue
        cubes = {}
        ok = True
        for c in CUBES:
            p = rng.uniform([-0.15, -0.2], [0.15, 0.2])
            # cubes start off the zones and apart from each other
            if any(np.abs(p - z).max() < ZONE_HALF + CUBE_HALF + 0.01 for z in zones.values()) or \
               any(np.linalg.norm(p - q) < 0.09 for q in cubes.values()):
                ok = False
                break
            cubes[c] = p
        if not ok:
            continue
        hand = np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.08, 0.08), rng.uniform(0.12, 0.16)])
        yaws = {c: rng.uniform(-0.4, 0.4) for c in CUBES}
        return {"zones": zones, "cubes": cubes, "cube_yaw": yaws, "hand": hand}
    raise RuntimeError("could not sample a tabletop layout")


def _stream(seed_name: str, n: int) -> list[dict]:
    rng = np.random.default_rng(zlib.crc32(seed_name.encode()))
    return [_sample_layout(rng) for _ in range(n)]


def layouts(task: TaskSpec, n: int) -> list[dict]:
    """The first ``n`` layouts of the task's seeded layout stream (fixed states, then demonstration layouts)."""
    return _stream(task.task_id, n)


def heldout_layouts(task: TaskSpec, n: int = HELDOUT_LAYOUTS) -> list[dict]:
    """The first ``n`` layouts of the task's held-out stream, seeded apart from the training stream."""
    return _stream(task.task_id + "/heldout", n)


def layout_key(layout: dict) -> bytes:
    """The exact positions of a layout's objects, as a hashable key (equal keys: the same scene)."""
    parts = [layout["cubes"][c] for c in sorted(layout["cubes"])] + [layout["zones"][z] for z in sorted(layout["zones"])]
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts]).tobytes()


@functools.lru_cache(maxsize=None)
def _heldout_keys(task_id: str) -> frozenset:
    return frozenset(layout_key(x) for x in heldout_layouts(TASKS[task_id]))


def open_layout(task: TaskSpec, k: int) -> dict:
    """Layout ``k`` of the task's open training stream: its own seed per index, so any index is drawn in
    microseconds and names the same scene on every machine; never one of the held-out layouts."""
    if not 0 <= k < OPEN_LAYOUTS:
        raise ValueError(f"open-stream layout index must be in [0, 2**62); got {k}")
    rng = np.random.default_rng([zlib.crc32((task.task_id + "/open").encode()), int(k)])
    heldout = _heldout_keys(task.task_id)
    while True:
        layout = _sample_layout(rng)
        if layout_key(layout) not in heldout:
            return layout


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")
    return split


def split_size(task: TaskSpec, split: str) -> int:
    """How many layouts a split offers (the range of ``reset(options={"init_state": k})``)."""
    return {"fixed": task.num_init_states, "open": OPEN_LAYOUTS, "heldout": HELDOUT_LAYOUTS}[check_split(split)]


def split_layouts(task: TaskSpec, split: str, demo_layouts: int = 0) -> list[dict]:
    """The layouts an env on ``split`` resets to; ``demo_layouts`` widens the fixed split for recording
    demonstrations, which must never see held-out scenes. The open split has no list (``open_layout``)."""
    if check_split(split) == "open":
        raise ValueError("the open split is drawn layout by layout: use open_layout(task, k)")
    if check_split(split) == "heldout":
        if demo_layouts:
            raise ValueError(f"demo_layouts={demo_layouts} records demonstrations, which must not see held-out "
                             "layouts: build demonstration envs with split='fixed'")
        return heldout_layouts(task, HELDOUT_LAYOUTS)
    return init_states(task, demo_layouts)


def init_states(task: TaskSpec, n: int | None = None) -> list[dict]:
    """The fixed initial states (the first ``num_init_states`` layouts). Demonstrations may be recorded
    on more layouts of the same stream (``n``): more distinct scenes generalise better than repeats."""
    return layouts(task, max(task.num_init_states, n or 0))


# ---- predicates and potentials ----------------------------------------------------------------
def on_zone(cube_pos: np.ndarray, zone_pos: np.ndarray) -> bool:
    return bool(np.abs(cube_pos[:2] - zone_pos[:2]).max() <= ZONE_HALF and cube_pos[2] < 2.5 * CUBE_HALF)


def step_done(step: Step, s: dict) -> bool:
    cube = s["cubes"][step.cube]
    if step.kind == "reach":
        return bool(np.linalg.norm(s["tip"][:2] - cube[:2]) < REACH_TOL and abs(s["tip"][2] - cube[2]) < REACH_Z_TOL)
    if step.kind == "lift":
        return bool(s["held"] == step.cube and cube[2] > LIFT_HEIGHT)
    if step.kind == "push":
        return on_zone(cube, s["zones"][step.zone])
    if step.kind == "place":
        return on_zone(cube, s["zones"][step.zone]) and s["held"] != step.cube
    raise ValueError(step.kind)


def step_progress(step: Step, s: dict, start: dict) -> float:
    cube = s["cubes"][step.cube]
    reach = 1.0 - min(1.0, np.linalg.norm(s["tip"] - cube) / SCALE)
    if step.kind == "reach":
        return reach
    if step.kind == "lift":
        held = float(s["held"] == step.cube)
        return 0.5 * reach + 0.2 * held + 0.3 * held * min(1.0, max(0.0, cube[2] - CUBE_HALF) / (LIFT_HEIGHT - CUBE_HALF))
    zone = s["zones"][step.zone]
    d0 = max(1e-3, np.linalg.norm(start["cubes"][step.cube][:2] - zone[:2]))
    moved = 1.0 - min(1.0, np.linalg.norm(cube[:2] - zone[:2]) / d0)
    if step.kind == "push":
        return 0.3 * reach + 0.7 * moved
    held = float(s["held"] == step.cube)
    return 0.3 * reach + 0.2 * held + 0.5 * moved


def success(task: TaskSpec, s: dict) -> bool:
    return all(step_done(st, s) for st in task.steps)


def progress(task: TaskSpec, s: dict, start: dict, stage: int) -> float:
    """Stage-wise potential: completed sub-goals count fully, the current one partially."""
    n = len(task.steps)
    if stage >= n:
        return 1.0
    return (stage + step_progress(task.steps[stage], s, start)) / n
