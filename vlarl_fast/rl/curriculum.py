"""Curriculum over (task, initial state): practise where the outcome is still uncertain.

VLA-RL's curriculum selection favours what the policy solves about half of the time: those
episodes carry the most learning signal (a pair it always solves or always fails gives
advantages near zero after the critic has learnt it). Each pair keeps an exponential moving
average ``s`` of its success, starting at 0.5; an initial state of a task is drawn with
probability proportional to ``exp((0.5 - |s - 0.5|) / temperature)``, mixed with a uniform
draw (``uniform_mix``) so that no pair is ever starved and its estimate can recover.
"""
from __future__ import annotations

import numpy as np


class Curriculum:
    def __init__(self, num_init_states: dict[str, int], *, temperature: float = 0.1, ema: float = 0.3,
                 uniform_mix: float = 0.2, seed: int = 0):
        if temperature <= 0:
            raise ValueError(f"curriculum temperature must be > 0; got {temperature}")
        if not 0 < ema <= 1:
            raise ValueError(f"curriculum ema must be in (0, 1]; got {ema}")
        if not 0 <= uniform_mix <= 1:
            raise ValueError(f"curriculum uniform_mix must be in [0, 1]; got {uniform_mix}")
        self.temperature, self.ema, self.uniform_mix = temperature, ema, uniform_mix
        self.success = {t: np.full(n, 0.5) for t, n in num_init_states.items()}
        self.visits = {t: np.zeros(n, dtype=np.int64) for t, n in num_init_states.items()}
        self.rng = np.random.default_rng(seed)

    def probabilities(self, task: str) -> np.ndarray:
        s = self.success[task]
        w = np.exp((0.5 - np.abs(s - 0.5)) / self.temperature)
        p = w / w.sum()
        return (1 - self.uniform_mix) * p + self.uniform_mix / len(s)

    def sample(self, task: str) -> int:
        p = self.probabilities(task)
        return int(self.rng.choice(len(p), p=p))

    def update(self, task: str, init_state: int, success: bool) -> None:
        if task not in self.success or not 0 <= init_state < len(self.success[task]):
            return  # an episode that did not start from a curriculum pair (e.g. the very first reset)
        s = self.success[task]
        s[init_state] += self.ema * (float(success) - s[init_state])
        self.visits[task][init_state] += 1

    def mean_success(self) -> float:
        """Average estimated success over all pairs (a smoothed view of training progress)."""
        return float(np.mean(np.concatenate(list(self.success.values()))))
