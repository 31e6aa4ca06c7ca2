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
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np

FILENAME = "curriculum.json"


class Curriculum:
    def __init__(self, num_init_states: dict[str, int], *, temperature: float = 0.1, window: int = 8,
                 floor: float = 0.2, seed: int = 0):
        if temperature <= 0:
            raise ValueError(f"curriculum temperature must be > 0; got {temperature}")
        if window < 1:
            raise ValueError(f"curriculum window must be >= 1; got {window}")
        if not 0 <= floor <= 1:
            raise ValueError(f"curriculum floor must be in [0, 1]; got {floor}")
        self.temperature, self.window, self.floor = temperature, window, floor
        self.outcomes = {t: [deque(maxlen=window) for _ in range(n)] for t, n in num_init_states.items()}
        self.visits = {t: np.zeros(n, dtype=np.int64) for t, n in num_init_states.items()}
        self.rng = np.random.default_rng(seed)

    # ---- statistics -----------------------------------------------------------------------
    def success(self, task: str) -> np.ndarray:
        """Smoothed success over the window per initial state (0.5 for a pair never tried)."""
        return np.array([(sum(o) + 0.5) / (len(o) + 1) for o in self.outcomes[task]])

    def probabilities(self, task: str) -> np.ndarray:
        unvisited = self.visits[task] == 0
        if unvisited.any():
            return unvisited / unvisited.sum()
        s = self.success(task)
        w = (0.5 - np.abs(s - 0.5)) / self.temperature
        p = np.exp(w - w.max())
        p /= p.sum()
        return (1 - self.floor) * p + self.floor / len(s)

    def sample(self, task: str) -> int:
        p = self.probabilities(task)
        return int(self.rng.choice(len(p), p=p))

    def update(self, task: str, init_state: int, success: bool) -> None:
        if task not in self.outcomes or not 0 <= init_state < len(self.outcomes[task]):
            return  # an episode that did not start from a curriculum pair (e.g. the very first reset)
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
        return {"temperature": self.temperature, "window": self.window, "floor": self.floor,
                "outcomes": {t: [list(o) for o in outs] for t, outs in self.outcomes.items()},
                "visits": {t: v.tolist() for t, v in self.visits.items()}}

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore the statistics of the tasks both know; returns the tasks restored. This run's window
        applies: a longer saved history keeps only its most recent outcomes."""
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
