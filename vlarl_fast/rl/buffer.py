"""Time-major rollout storage [T, N] for trajectory-level PPO.

Per environment step it keeps what the update needs to re-run the teacher-forced forward:
the observation (cached vision features when the vision tower is frozen, else the image),
the proprio state, the instruction, the 7 sampled action tokens and their log-probs from the
rollout pass, the value, the reward and the episode flags.
"""
from __future__ import annotations

import torch

from ..policy import ACTION_DIM


class RolloutBuffer:
    """Observation and state storage take their shape and dtype from the first ``add``: cached features
    differ by model (and are bf16 for a bf16 tower), images by env, proprio by suite."""

    def __init__(self, num_steps: int, num_envs: int):
        T, N = num_steps, num_envs
        self.T, self.N = T, N
        self.obs: torch.Tensor | None = None
        self.states: torch.Tensor | None = None
        self.tokens = torch.zeros(T, N, ACTION_DIM, dtype=torch.long)
        self.logprobs = torch.zeros(T, N, ACTION_DIM)
        self.values = torch.zeros(T, N)
        self.next_values = torch.zeros(T, N)
        self.rewards = torch.zeros(T, N)
        self.terminated = torch.zeros(T, N)
        self.episode_end = torch.zeros(T, N)
        self.instructions: list[list[str]] = [[""] * N for _ in range(T)]

    def add(self, t: int, obs, states, tokens, logprobs, values, instructions) -> None:
        if self.obs is None:
            self.obs = torch.zeros((self.T, self.N) + tuple(obs.shape[1:]), dtype=obs.dtype)
            self.states = torch.zeros((self.T, self.N) + tuple(states.shape[1:]), dtype=torch.float32)
        self.obs[t] = obs
        self.states[t] = states
        self.tokens[t] = tokens
        self.logprobs[t] = logprobs
        self.values[t] = values
        self.instructions[t] = list(instructions)

    def flat(self) -> dict:
        B = self.T * self.N
        return {"obs": self.obs.reshape((B,) + self.obs.shape[2:]), "states": self.states.reshape(B, -1),
                "tokens": self.tokens.reshape(B, ACTION_DIM), "logprobs": self.logprobs.reshape(B, ACTION_DIM),
                "values": self.values.reshape(B),
                "instructions": [s for row in self.instructions for s in row]}
