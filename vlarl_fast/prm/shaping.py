"""The reward model's output as a reward during RL, in a form that keeps the optimal policy.

The reward model's P(completed | frame) is a potential Phi, and each step earns

    r'_t = r_t + coef * (gamma * Phi(s_{t+1}) - Phi(s_t)),   Phi(s_{t+1}) = 0 where the episode terminated,

potential-based shaping (Ng, Harada and Russell, 1999): along any episode the extra terms telescope to
-Phi(s_0) (plus a discounted Phi of the last state at a time-limit cut, which the bootstrap values carry on),
so no policy gains by farming the model's mistakes, while each step is credited at once with the progress
it makes. This is the form of the tabletop suite's hand-shaped dense reward (progress differences).
"""
from __future__ import annotations

import time

import numpy as np

from .model import RewardModel


class PRMShaping:
    def __init__(self, rm: RewardModel, coef: float, gamma: float, batch_size: int = 256):
        if not np.isfinite(coef):
            raise ValueError(f"--reward.prm-coef must be finite; got {coef}")
        self.rm, self.coef, self.gamma, self.batch_size = rm, float(coef), float(gamma), batch_size
        self.phi: np.ndarray | None = None   # Phi of the current observation of every env
        self.seconds = 0.0                   # scoring time, for the run's log
        self.steps = 0

    def _score(self, images, states, instructions) -> np.ndarray:
        return self.rm.score(images, states, list(instructions), batch_size=self.batch_size)

    def reset(self, obs: dict, instructions: list[str]) -> None:
        t0 = time.perf_counter()
        self.phi = self._score(obs["image"], obs["state"], instructions)
        self.seconds += time.perf_counter() - t0

    def __call__(self, reward: np.ndarray, next_obs: dict, next_instructions: list[str], instructions: list[str],
                 terminated: np.ndarray, truncated: np.ndarray, info: dict, ids=None) -> np.ndarray:
        """The shaped rewards of one vector step (of envs ``ids``; None: all). ``next_obs`` is, for an env whose
        episode ended, the first observation of its next episode; ``info["final_obs"]`` the last of the one that
        ended."""
        if self.phi is None:
            raise RuntimeError("PRMShaping.reset(obs, instructions) must score the first observations first")
        t0 = time.perf_counter()
        phi_next = self._score(next_obs["image"], next_obs["state"], next_instructions)
        ended = np.flatnonzero(truncated & ~terminated)
        phi_end = phi_next.copy()
        if len(ended):
            fo = info["final_obs"]
            phi_end[ended] = self._score(fo["image"][ended], fo["state"][ended], [instructions[i] for i in ended])
        phi_end[terminated] = 0.0
        rows = slice(None) if ids is None else np.asarray(ids)
        shaped = np.asarray(reward, dtype=np.float32) + self.coef * (self.gamma * phi_end - self.phi[rows])
        self.phi[rows] = phi_next
        self.seconds += time.perf_counter() - t0
        self.steps += len(reward)
        return shaped.astype(np.float32)
