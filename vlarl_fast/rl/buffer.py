"""Time-major rollout storage [T, N] for trajectory-level PPO.

Per environment step it keeps what the update needs to re-run the teacher-forced forward:
the observation (cached vision features when the vision tower is frozen, else the image),
the proprio state, the instruction, the 7 sampled action tokens and their log-probs from the
rollout pass, the value, the reward and the episode flags.
"""
from __future__ import annotations

import numpy as np
import torch

from ..policy import ACTION_DIM
from ..policy.policy import FrozenInputs


class RolloutBuffer:
    """Observation and state storage take their shape and dtype from the first ``add``: cached features
    differ by model (and are bf16 for a bf16 tower), images by env, proprio by suite.

    The [T, N] scalars GAE reads (values, next values, rewards, episode flags) live on ``device``, the
    policy's: values arrive there from the policy without a per-step copy to the host, GAE runs there (its
    Triton kernel on a GPU), and the advantages and returns it gives stay there for the update. Everything
    else (observations, tokens, log-probs) stays in host memory, which holds the rollout at any size."""

    def __init__(self, num_steps: int, num_envs: int, device: torch.device | str = "cpu"):
        T, N = num_steps, num_envs
        self.T, self.N = T, N
        self.device = torch.device(device)
        self.obs: torch.Tensor | None = None
        self.states: torch.Tensor | None = None
        self.tokens = torch.zeros(T, N, ACTION_DIM, dtype=torch.long)
        self.logprobs = torch.zeros(T, N, ACTION_DIM)
        on_device = dict(dtype=torch.float32, device=self.device)
        self.values = torch.zeros(T, N, **on_device)
        self.next_values = torch.zeros(T, N, **on_device)
        self.rewards = torch.zeros(T, N, **on_device)
        self.terminated = torch.zeros(T, N, **on_device)
        self.episode_end = torch.zeros(T, N, **on_device)
        self.instructions: list[list[str]] = [[""] * N for _ in range(T)]
        self.frozen: list[FrozenInputs | None] = [None] * T

    def add(self, t: int, obs, states, tokens, logprobs, values, instructions, frozen=None) -> None:
        if self.obs is None:
            self.obs = torch.zeros((self.T, self.N) + tuple(obs.shape[1:]), dtype=obs.dtype)
            self.states = torch.zeros((self.T, self.N) + tuple(states.shape[1:]), dtype=torch.float32)
        self.obs[t] = obs
        self.states[t] = states
        self.tokens[t] = tokens
        self.logprobs[t] = logprobs
        self.values[t] = values
        self.instructions[t] = list(instructions)
        self.frozen[t] = frozen

    def frozen_rows(self, idx) -> FrozenInputs:
        """The frozen-layer inputs (``VLAPolicy.act(capture_layer=...)``) of flat rows ``idx``, left-padded to
        the longest: prompts of different steps differ in length, and left padding keeps every row's action
        columns last. Padding columns are masked out and carry zeros."""
        idx = np.asarray(idx)
        ts, ns = idx // self.N, idx % self.N
        steps = [int(t) for t in np.unique(ts)]
        first = self.frozen[steps[0]]
        L = max(self.frozen[t].hidden.shape[1] for t in steps)
        B, H = len(idx), first.hidden.shape[2]
        hidden = first.hidden.new_zeros(B, L, H)
        mask, pos = first.mask.new_zeros(B, L), first.pos.new_zeros(B, L)
        for t in steps:
            rows = np.flatnonzero(ts == t)
            f = self.frozen[t]
            cols = slice(L - f.hidden.shape[1], L)
            hidden[rows, cols] = f.hidden[ns[rows]]
            mask[rows, cols] = f.mask[ns[rows]]
            pos[rows, cols] = f.pos[ns[rows]]
        return FrozenInputs(hidden, mask, pos)

    def flat(self) -> dict:
        B = self.T * self.N
        return {"obs": self.obs.reshape((B,) + self.obs.shape[2:]), "states": self.states.reshape(B, -1),
                "tokens": self.tokens.reshape(B, ACTION_DIM), "logprobs": self.logprobs.reshape(B, ACTION_DIM),
                "values": self.values.reshape(B),
                "instructions": [s for row in self.instructions for s in row]}
