"""Vectorised stepping with gymnasium's vector API (same-step auto-reset) and EnvPool-style
``send``/``recv``.

This is the in-process implementation: every env steps in the calling process, one after
another. ``VectorEnv(env_fns, backend="process", ...)`` gives the worker-process manager
(process_vector.ProcessVectorEnv) behind the same interface instead.

Auto-reset: when an env's episode ends inside ``step``, it is reset at once; the returned
observation is the new episode's first, and ``info["final_obs"]`` holds the last observation
of the finished episode (needed to bootstrap the value at a time-limit truncation).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


def _stack(obs_list: list[dict]) -> dict:
    return {k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]}


class VectorEnvBase:
    """What both backends share: per-env episode facts (kept in ``_instructions``, ``_task_ids``,
    ``_init_states``), ``with``-statement support and a last-chance ``close()`` when collected."""

    @property
    def instructions(self) -> list[str]:
        return list(self._instructions)

    @property
    def task_ids(self) -> list[str]:
        return list(self._task_ids)

    @property
    def init_states(self) -> np.ndarray:
        return self._init_states.copy()

    def close(self) -> None:  # pragma: no cover - every backend defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class VectorEnv(VectorEnvBase):
    def __new__(cls, env_fns=(), *, backend: str = "inprocess", **kwargs):
        if backend == "process":
            from .process_vector import ProcessVectorEnv
            return ProcessVectorEnv(env_fns, **kwargs)  # not a VectorEnv: __init__ is not run again
        if backend != "inprocess":
            raise ValueError(f"unknown VectorEnv backend {backend!r}; use 'inprocess' or 'process'")
        return super().__new__(cls)

    def __init__(self, env_fns: Sequence[Callable[[], Any]], *, reset_options: Callable[[int], dict | None] | None = None,
                 autoreset: bool = True, backend: str = "inprocess"):
        if not env_fns:
            raise ValueError("VectorEnv needs at least one env factory")
        self.envs = [fn() for fn in env_fns]
        self.num_envs = len(self.envs)
        self.single_action_space = self.envs[0].action_space
        self.single_observation_space = self.envs[0].observation_space
        self.reset_options = reset_options
        self.autoreset = autoreset
        self._obs: list[dict | None] = [None] * self.num_envs
        self._instructions = [""] * self.num_envs
        self._task_ids = [""] * self.num_envs
        self._init_states = np.zeros(self.num_envs, dtype=np.int64)
        self._ep_return = np.zeros(self.num_envs, dtype=np.float64)
        self._ep_len = np.zeros(self.num_envs, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._closed = False

    # ---- helpers ---------------------------------------------------------------------------
    def reset_env(self, i: int, seed: int | None = None, options: dict | None = None) -> dict:
        """Reset one env (e.g. to a chosen initial state); returns its first observation."""
        if options is None and self.reset_options is not None:
            options = self.reset_options(i)
        obs, info = self.envs[i].reset(seed=seed, options=options)
        self._instructions[i] = info.get("instruction", "")
        self._task_ids[i] = info.get("task_id", "")
        self._init_states[i] = info.get("init_state", -1)
        self._ep_return[i] = 0.0
        self._ep_len[i] = 0
        self._obs[i] = obs
        return obs

    def observations(self, ids) -> dict:
        """Current observations of the given envs, stacked."""
        return _stack([self._obs[i] for i in ids])

    # ---- gymnasium vector API --------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int] | None = None, options: dict | None = None):
        if seed is None or isinstance(seed, (int, np.integer)):
            seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset got {len(seeds)} seeds for {self.num_envs} envs")
        per_env = options.get("per_env") if options else None
        obs = [self.reset_env(i, seeds[i], per_env[i] if per_env else None) for i in range(self.num_envs)]
        return _stack(obs), self._info(np.arange(self.num_envs))

    def _info(self, ids: np.ndarray) -> dict:
        return {"env_id": ids, "instruction": [self._instructions[i] for i in ids],
                "task_id": [self._task_ids[i] for i in ids], "init_state": self._init_states[ids]}

    def _step_ids(self, actions: np.ndarray, ids: np.ndarray):
        actions = np.asarray(actions, dtype=np.float32)
        expected = (len(ids),) + tuple(self.single_action_space.shape)
        if actions.shape != expected:
            raise ValueError(f"actions must have shape {expected} (one {self.single_action_space.shape} action "
                             f"per env); got {actions.shape}")
        n = len(ids)
        rewards = np.zeros(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        success = np.zeros(n, dtype=bool)
        obs_out, final_obs = [], [None] * n
        ep_ret = np.zeros(n, dtype=np.float32)
        ep_len = np.zeros(n, dtype=np.int64)
        final_task, final_init = list(self._task_ids[i] for i in ids), self._init_states[ids].copy()
        for j, i in enumerate(ids):
            obs, r, term, trunc, info = self.envs[i].step(actions[j])
            rewards[j], terminated[j], truncated[j] = r, term, trunc
            success[j] = bool(info.get("success", False))
            self._ep_return[i] += r
            self._ep_len[i] += 1
            if term or trunc:
                final_obs[j] = obs
                ep_ret[j], ep_len[j] = self._ep_return[i], self._ep_len[i]
                if self.autoreset:
                    obs = self.reset_env(i)
            self._obs[i] = obs
            obs_out.append(obs)
        done = terminated | truncated
        info = self._info(ids)
        info.update(success=success, done=done, episode_return=ep_ret, episode_length=ep_len,
                    final_task_id=final_task, final_init_state=final_init)
        if done.any():
            filled = [fo if fo is not None else obs_out[j] for j, fo in enumerate(final_obs)]
            info["final_obs"] = _stack(filled)
        return _stack(obs_out), rewards, terminated, truncated, info

    def step(self, actions):
        return self._step_ids(actions, np.arange(self.num_envs))

    # ---- EnvPool-style async API ------------------------------------------------------------
    def send(self, actions, env_ids) -> None:
        self._pending.append((np.asarray(actions), np.asarray(env_ids, dtype=np.int64)))

    def recv(self):
        if not self._pending:
            raise RuntimeError("recv() called with no batch in flight: call send(actions, env_ids) first")
        actions, ids = self._pending.pop(0)
        return self._step_ids(actions, ids)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for env in self.envs:
            env.close()
