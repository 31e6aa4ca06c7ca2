"""Envs that fail on purpose, for the crash-recovery tests of the env workers and the trainer (a module of its
own, so that spawned worker processes can import it)."""
import os

import gymnasium as gym


class RaiseOnStep(gym.Wrapper):
    """Raises on its k-th step after each reset, only in its first process (a marker file says so)."""

    def __init__(self, env, k, marker):
        super().__init__(env)
        self.k, self.marker, self.n = k, marker, 0

    def reset(self, **kw):
        self.n = 0
        return self.env.reset(**kw)

    def step(self, action):
        self.n += 1
        if self.n == self.k and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise FloatingPointError("simulated physics blow-up")
        return self.env.step(action)
