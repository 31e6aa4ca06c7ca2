"""Curriculum over (task, initial state): practise where the outcome is still uncertain.

VLA-RL's curriculum selection favours what the policy solves about half of the time: those
episodes carry the most learning signal (a pair it always solves or always fails gives
advantages near zero once the critic has learnt it). Per pair:

- the last ``window`` outcomes are kept; the success estimate is (successes + 0.5) / (n + 1),
  so one lucky or unlucky episode does not push a pair to the bottom of the list;
- a pair never tried yet is drawn first (uniformly among the task's unvisited pairs);
- otherwise a pair is drawn with probability ``(1 - floor) * softmax(w) + floor / n`` where
  ``w = (0.5 - |s - 0.5|) / temperature``: the floor keeps every pair in play so its estimate
  can recover when the policy changes.

The statistics are plain lists (``state_dict``), saved beside checkpoints as curriculum.json
and restored when training resumes from one.

``OpenCurriculum`` is the same rule over the open stream of training layouts, where a task has no
fixed set of initial states: a share ``fresh`` of draws is a layout never seen before (the next index
of the stream), the rest replay a layout from a bounded pool of those already tried, weighted as
above (Prioritized Level Replay's scheme, Jiang et al. 2021, with VLA-RL's weights).
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np

FILENAME = "curriculum.json"


def _check(temperature: float, window: int, floor: float) -> None:
    if temperature <= 0:
        raise ValueError(f"curriculum temperature must be > 0; got {temperature}")
    if window < 1:
        raise ValueError(f"curriculum window must be >= 1; got {window}")
    if not 0 <= floor <= 1:
        raise ValueError(f"curriculum floor must be in [0, 1]; got {floor}")


def smoothed_success(outcomes) -> float:
    return (sum(outcomes) + 0.5) / (len(outcomes) + 1)


def replay_probabilities(success: np.ndarray, temperature: float, floor: float) -> np.ndarray:
    """VLA-RL's weights: favour success near one half, with a share ``floor`` spread uniformly."""
    w = (0.5 - np.abs(success - 0.5)) / temperature
    p = np.exp(w - w.max())
    p /= p.sum()
    return (1 - floor) * p + floor / len(success)


class Curriculum:
    kind = "fixed"

    def __init__(self, num_init_states: dict[str, int], *, temperature: float = 0.1, window: int = 8,
                 floor: float = 0.2, seed: int = 0):
        _check(temperature, window, floor)
        self.temperature, self.window, self.floor = temperature, window, floor
        self.outcomes = {t: [deque(maxlen=window) for _ in range(n)] for t, n in num_init_states.items()}
        self.visits = {t: np.zeros(n, dtype=np.int64) for t, n in num_init_states.items()}
        self.rng = np.random.default_rng(seed)

    # ---- statistics -----------------------------------------------------------------------
    def success(self, task: str) -> np.ndarray:
        """Smoothed success over the window per initial state (0.5 for a pair never tried)."""
        return np.array([smoothed_success(o) for o in self.outcomes[task]])

    def probabilities(self, task: str) -> np.ndarray:
        unvisited = self.visits[task] == 0
        if unvisited.any():
            return unvisited / unvisited.sum()
        return replay_probabilities(self.success(task), self.temperature, self.floor)

    def sample(self, task: str) -> int:
        p = self.probabilities(task)
        return int(self.rng.choice(len(p), p=p))

    def update(self, task: str, init_state: int, success: bool) -> bool:
        """Count an episode's outcome; False (and nothing counted) for an episode that did not start from a
        curriculum pair (e.g. the very first reset)."""
        if task not in self.outcomes or not 0 <= init_state < len(self.outcomes[task]):
            return False
        self.record(task, init_state, success)
        return True

    def record(self, task: str, init_state: int, success: bool) -> None:
        """Count an outcome ``update`` accepted (here or on another rank)."""
        self.outcomes[task][init_state].append(int(bool(success)))
        self.visits[task][init_state] += 1

    def mean_success(self) -> float:
        """Average smoothed success over all pairs (a view of training progress)."""
        return float(np.mean(np.concatenate([self.success(t) for t in self.outcomes])))

    def summary(self) -> dict:
        """Scalars for the log: mean success, share of pairs visited, share of draws the top 20% of pairs get."""
        probs = np.concatenate([self.probabilities(t) / len(self.outcomes) for t in self.outcomes])
        top = np.sort(probs)[::-1][: max(1, len(probs) // 5)].sum()
        visited = np.concatenate([v > 0 for v in self.visits.values()])
        return {"mean_success": self.mean_success(), "visited": float(visited.mean()), "top20_share": float(top)}

    # ---- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": self.kind, "temperature": self.temperature, "window": self.window, "floor": self.floor,
                "outcomes": {t: [list(o) for o in outs] for t, outs in self.outcomes.items()},
                "visits": {t: v.tolist() for t, v in self.visits.items()}}

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore the statistics of the tasks both know; returns the tasks restored. This run's window
        applies: a longer saved history keeps only its most recent outcomes."""
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"{FILENAME} holds a curriculum over the open stream of layouts; this run practises on "
                             f"the fixed initial states (--ppo.layouts fixed): start a fresh curriculum (delete "
                             f"{FILENAME}) or add --ppo.layouts open")
        restored = []
        for t, outs in state.get("outcomes", {}).items():
            if t not in self.outcomes:
                continue
            if len(outs) != len(self.outcomes[t]):
                raise ValueError(f"curriculum statistics for {t} cover {len(outs)} initial states; this run has "
                                 f"{len(self.outcomes[t])}: start a fresh curriculum (delete {FILENAME})")
            self.outcomes[t] = [deque((int(x) for x in o), maxlen=self.window) for o in outs]
            self.visits[t] = np.asarray(state["visits"][t], dtype=np.int64)
            restored.append(t)
        return restored

    def save(self, directory: str | Path) -> Path:
        from ..report import write_json_atomic
        path = Path(directory) / FILENAME
        write_json_atomic(path, self.state_dict())
        return path

    def load(self, directory: str | Path) -> list[str]:
        """Restore from ``directory``/curriculum.json if present; returns the tasks restored."""
        path = Path(directory) / FILENAME
        if not path.is_file():
            return []
        return self.load_state_dict(json.loads(path.read_text()))


class OpenCurriculum:
    """The curriculum over each task's open stream of layouts (``split="open"``): layout indices are the
    stream's, handed out in order when fresh, so a run is reproducible and never repeats a fresh draw."""

    kind = "open"

    def __init__(self, tasks: list[str], *, fresh: float = 0.5, pool: int = 256, temperature: float = 0.1,
                 window: int = 8, floor: float = 0.2, seed: int = 0, stride: int = 1, offset: int = 0):
        """``stride``, ``offset``: fresh layouts are offset, offset + stride, ...: the ranks of a data-parallel
        run (offset = rank, stride = world) never hand out the same fresh layout."""
        _check(temperature, window, floor)
        if not 0 < fresh <= 1:
            raise ValueError(f"curriculum fresh share must be in (0, 1]; got {fresh}")
        if pool < 1:
            raise ValueError(f"curriculum pool must be >= 1; got {pool}")
        self.fresh, self.pool_size = fresh, pool
        self.temperature, self.window, self.floor = temperature, window, floor
        self.stride, self.offset = stride, offset
        self.next_fresh = {t: offset for t in tasks}
        self.pool: dict[str, dict[int, deque]] = {t: {} for t in tasks}   # insertion order: oldest first
        self.rng = np.random.default_rng(seed)

    def success(self, task: str) -> np.ndarray:
        """Smoothed success of every layout in the task's replay pool, oldest first."""
        return np.array([smoothed_success(o) for o in self.pool[task].values()])

    def sample(self, task: str) -> int:
        pool = self.pool[task]
        if not pool or self.rng.random() < self.fresh:
            k = self.next_fresh[task]
            self.next_fresh[task] = k + self.stride
            return k
        p = replay_probabilities(self.success(task), self.temperature, self.floor)
        return list(pool)[int(self.rng.choice(len(p), p=p))]

    def update(self, task: str, init_state: int, success: bool) -> bool:
        """Count an episode's outcome; False (and nothing counted) for a layout this curriculum did not hand out
        (e.g. the very first reset)."""
        if task not in self.pool:
            return False
        ours = self.offset <= init_state < self.next_fresh[task] and (init_state - self.offset) % self.stride == 0
        if not ours and init_state not in self.pool[task]:   # the pool also holds other ranks' layouts
            return False
        self.record(task, init_state, success)
        return True

    def record(self, task: str, init_state: int, success: bool) -> None:
        """Count an outcome ``update`` accepted (here or on another rank)."""
        pool = self.pool[task]
        if init_state not in pool:
            if len(pool) >= self.pool_size:
                # the layout that teaches least leaves: lowest replay weight, the oldest among equals
                s = self.success(task)
                del pool[list(pool)[int(np.argmin(0.5 - np.abs(s - 0.5)))]]
            pool[init_state] = deque(maxlen=self.window)
        pool[init_state].append(int(bool(success)))

    def mean_success(self) -> float:
        s = [self.success(t) for t in self.pool if self.pool[t]]
        return float(np.mean(np.concatenate(s))) if s else 0.5

    def summary(self) -> dict:
        """Scalars for the log: mean success over the pools, layouts drawn fresh, pool fill."""
        return {"mean_success": self.mean_success(), "fresh_layouts": float(sum((k - self.offset) // self.stride
                                                                              for k in self.next_fresh.values())),
                "pool_fill": float(np.mean([len(p) / self.pool_size for p in self.pool.values()]))}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "fresh": self.fresh, "pool_size": self.pool_size,
                "temperature": self.temperature, "window": self.window, "floor": self.floor,
                "next_fresh": dict(self.next_fresh),
                "pool": {t: [[k, list(o)] for k, o in p.items()] for t, p in self.pool.items()}}

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore the tasks both know; returns them. A fixed-split curriculum's statistics do not apply."""
        if state.get("kind") != self.kind:
            raise ValueError(f"{FILENAME} holds a curriculum over fixed initial states; this run practises on the "
                             f"open stream (--ppo.layouts open): start a fresh curriculum (delete {FILENAME})")
        restored = []
        for t, items in state.get("pool", {}).items():
            if t not in self.pool:
                continue
            self.pool[t] = {int(k): deque((int(x) for x in o), maxlen=self.window) for k, o in items[-self.pool_size:]}
            k = int(state["next_fresh"][t])
            self.next_fresh[t] = k + (self.offset - k) % self.stride   # this rank's next fresh layout from there
            restored.append(t)
        return restored

    save = Curriculum.save
    load = Curriculum.load
