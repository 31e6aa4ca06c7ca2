"""Time-major rollout storage [T, N] for trajectory-level PPO and the group algorithms.

Per environment step it keeps what the update needs to re-run the teacher-forced forward:
the observation (cached vision features when the vision tower is frozen, else the image),
the proprio state, the instruction, the 7 sampled action tokens and their log-probs from the
rollout pass, the value, the reward and the episode flags. Every write goes through a method here
(CleanRL's habit: one home for rollout storage), the next-value fix-up at the end of a rollout included.

A row is ``valid`` when it is a real transition the update may learn from: rows of envs that sat out a
step (group rollouts step only the envs whose group is still running), steps a worker restart cut short,
and episodes of dropped groups are not.
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
    else (observations, tokens, log-probs) stays in host memory, which holds the rollout at any size.

    ``T`` grows on demand (``reserve``): a group rollout runs until its groups' episodes are complete."""

    def __init__(self, num_steps: int, num_envs: int, device: torch.device | str = "cpu"):
        self.N = num_envs
        self.device = torch.device(device)
        self.T = 0           # rows in use (steps of the current rollout)
        self.capacity = 0
        self.obs: torch.Tensor | None = None
        self.states: torch.Tensor | None = None
        self._allocate(num_steps)
        self.T = num_steps

    # ---- storage -----------------------------------------------------------------------------
    def _allocate(self, T: int) -> None:
        """Storage for T steps; rows already written are kept."""
        N, old = self.N, self.capacity
        on_device = dict(dtype=torch.float32, device=self.device)

        def grown(t: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
            if t is not None and old:
                new[:old] = t[:old]
            return new

        self.tokens = grown(getattr(self, "tokens", None), torch.zeros(T, N, ACTION_DIM, dtype=torch.long))
        self.logprobs = grown(getattr(self, "logprobs", None), torch.zeros(T, N, ACTION_DIM))
        for name in ("values", "next_values", "rewards", "terminated", "episode_end"):
            setattr(self, name, grown(getattr(self, name, None), torch.zeros(T, N, **on_device)))
        self.valid = grown(getattr(self, "valid", None), torch.zeros(T, N, dtype=torch.bool))
        self.episode = grown(getattr(self, "episode", None), torch.full((T, N), -1, dtype=torch.long))
        if self.obs is not None:
            self.obs = grown(self.obs, self.obs.new_zeros((T, N) + tuple(self.obs.shape[2:])))
            self.states = grown(self.states, self.states.new_zeros((T, N) + tuple(self.states.shape[2:])))
        self.instructions: list[list[str]] = (getattr(self, "instructions", [])[:old] +
                                              [[""] * N for _ in range(T - old)])
        # per step, the frozen-layer inputs of each batch the policy decoded: (env ids or None for all, inputs);
        # a pipelined or group rollout decodes a step's envs in several batches, whose prompts may differ in length
        self.frozen: list[list[tuple[np.ndarray | None, FrozenInputs]]] = \
            getattr(self, "frozen", [])[:old] + [[] for _ in range(T - old)]
        self.capacity = T

    def start(self, num_steps: int = 0) -> None:
        """Begin a rollout of ``num_steps`` steps (0 for a group rollout, which ``reserve``s as it goes): every
        row invalid until written."""
        if num_steps > self.capacity:
            self._allocate(num_steps)
        self.T = num_steps
        self.valid.zero_()
        self.episode.fill_(-1)
        self.next_values.zero_()
        self.frozen = [[] for _ in range(self.capacity)]

    def reserve(self, t: int) -> None:
        """Make row ``t`` usable, growing the storage geometrically."""
        if t >= self.capacity:
            self._allocate(max(t + 1, 2 * self.capacity))
        self.T = max(self.T, t + 1)

    # ---- writes of one step ------------------------------------------------------------------
    def add(self, t: int, obs, states, tokens, logprobs, values, instructions, frozen=None, ids=None,
            episode=None) -> None:
        """What the policy saw and did at step t, for envs ``ids`` (None: all N)."""
        rows = slice(None) if ids is None else torch.as_tensor(ids, dtype=torch.long)
        if self.obs is None:
            self.obs = torch.zeros((self.capacity, self.N) + tuple(obs.shape[1:]), dtype=obs.dtype)
            self.states = torch.zeros((self.capacity, self.N) + tuple(states.shape[1:]), dtype=torch.float32)
        self.obs[t, rows] = obs
        self.states[t, rows] = states
        self.tokens[t, rows] = tokens
        self.logprobs[t, rows] = logprobs
        self.values[t, rows.to(self.device) if ids is not None else rows] = values
        self.valid[t, rows] = True
        if episode is not None:
            self.episode[t, rows] = torch.as_tensor(episode, dtype=torch.long)
        if ids is None:
            self.instructions[t] = list(instructions)
        else:
            for j, i in enumerate(np.asarray(ids).tolist()):
                self.instructions[t][i] = instructions[j]
        if frozen is not None:
            if ids is None:
                self.frozen[t] = [(None, frozen)]
            else:
                self.frozen[t].append((np.asarray(ids), frozen))

    def record(self, t: int, rewards, terminated, truncated, restarted=None, ids=None) -> None:
        """The outcome of step t for envs ``ids`` (None: all N). A step that a worker restart cut short
        (``restarted``) has no transition: it leaves the update, and its episode ends at the step before, which
        bootstraps from V(s_t) (the observation the lost step started from) instead of from the fresh episode
        that the restart began. At t = 0 the previous rollout's last step already bootstrapped from V(s_0)."""
        ids_t = torch.arange(self.N) if ids is None else torch.as_tensor(np.asarray(ids), dtype=torch.long)
        d = ids_t.to(self.device)
        term = np.asarray(terminated, dtype=bool)
        ended = term | np.asarray(truncated, dtype=bool)
        lost = np.zeros_like(term) if restarted is None else np.asarray(restarted, dtype=bool)
        r = np.where(lost, 0.0, np.asarray(rewards, dtype=np.float32))
        self.rewards[t, d] = torch.as_tensor(r, dtype=torch.float32, device=self.device)
        self.terminated[t, d] = torch.as_tensor(term & ~lost, dtype=torch.float32, device=self.device)
        self.episode_end[t, d] = torch.as_tensor(ended | lost, dtype=torch.float32, device=self.device)
        if lost.any():
            lost_ids = ids_t[torch.as_tensor(lost)]
            self.valid[t, lost_ids] = False
            if t > 0:
                ld = lost_ids.to(self.device)
                self.episode_end[t - 1, ld] = 1.0
                self.next_values[t - 1, ld] = self.values[t, ld]

    def bootstrap(self, t: int, ids, values: torch.Tensor) -> None:
        """V(final observation) of envs ``ids`` whose episode a time limit cut at step t."""
        self.next_values[t, torch.as_tensor(np.asarray(ids), dtype=torch.long, device=self.device)] = values

    def finish(self, last_values: torch.Tensor) -> None:
        """The next-value fix-up at the end of a rollout: V(s_{t+1}) where the episode went on (the next row's
        value, or ``last_values`` after the last row); what ``bootstrap`` or ``record`` set where it ended; 0
        where it terminated."""
        T = self.T
        following = torch.cat([self.values[1:T], last_values[None].to(self.device)], 0)
        ended = self.episode_end[:T].bool()
        self.next_values[:T] = torch.where(ended, self.next_values[:T], following)
        self.next_values[:T][self.terminated[:T].bool()] = 0.0

    def drop_episodes(self, episodes) -> None:
        """Leave these episodes' rows out of the update (dynamic sampling's uninformative groups)."""
        if len(episodes):
            self.valid[:self.T] &= ~torch.isin(self.episode[:self.T], torch.as_tensor(list(episodes)))

    # ---- reads --------------------------------------------------------------------------------
    def frozen_rows(self, idx) -> FrozenInputs:
        """The frozen-layer inputs (``VLAPolicy.act(capture_layer=...)``) of flat rows ``idx``, left-padded to
        the longest: prompts of different batches differ in length, and left padding keeps every row's action
        columns last. Padding columns are masked out and carry zeros."""
        idx = np.asarray(idx)
        ts, ns = idx // self.N, idx % self.N
        steps = [int(t) for t in np.unique(ts)]
        pieces = [(t, ids, f) for t in steps for ids, f in self.frozen[t]]
        if not pieces:
            raise RuntimeError("no frozen-layer inputs were recorded for these rows: the rollout ran without "
                               "act(capture_layer=...)")
        first = pieces[0][2]
        L = max(f.hidden.shape[1] for _, _, f in pieces)
        B, H = len(idx), first.hidden.shape[2]
        hidden = first.hidden.new_zeros(B, L, H)
        mask, pos = first.mask.new_zeros(B, L), first.pos.new_zeros(B, L)
        found = np.zeros(B, dtype=bool)
        for t, ids, f in pieces:
            rows = np.flatnonzero(ts == t)
            if ids is None:
                src = ns[rows]
            else:   # the rows of this batch's envs, and where each env sits in the batch
                where = np.full(self.N, -1)
                where[ids] = np.arange(len(ids))
                src = where[ns[rows]]
                rows, src = rows[src >= 0], src[src >= 0]
            cols = slice(L - f.hidden.shape[1], L)
            hidden[rows, cols] = f.hidden[src]
            mask[rows, cols] = f.mask[src]
            pos[rows, cols] = f.pos[src]
            found[rows] = True
        if not found.all():
            raise RuntimeError(f"rows {idx[~found][:8].tolist()} have no frozen-layer inputs (their env was not "
                               "decoded at that step)")
        return FrozenInputs(hidden, mask, pos)

    def valid_rows(self) -> np.ndarray:
        """Flat indices (t * N + n) of the rows the update learns from."""
        return np.flatnonzero(self.valid[:self.T].reshape(-1).numpy())

    def flat(self) -> dict:
        T, B = self.T, self.T * self.N
        return {"obs": self.obs[:T].reshape((B,) + self.obs.shape[2:]), "states": self.states[:T].reshape(B, -1),
                "tokens": self.tokens[:T].reshape(B, ACTION_DIM), "logprobs": self.logprobs[:T].reshape(B, ACTION_DIM),
                "values": self.values[:T].reshape(B), "episode": self.episode[:T].reshape(B),
                "instructions": [s for row in self.instructions[:T] for s in row]}
