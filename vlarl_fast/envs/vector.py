"""Vectorised stepping with gymnasium's vector API (same-step auto-reset) and EnvPool-style
``send``/``recv``.

``VectorEnv(env_fns, backend=...)`` is the common type of two backends behind one interface:

- ``"process"``: ``process_vector.ProcessVectorEnv``, the envs stepped in worker processes through a
  shared-memory batch (needs the compiled extension);
- ``"inprocess"``: ``InProcessVectorEnv`` below, every env stepped in the calling process, one after
  another;
- ``"auto"`` (the default): ``"process"`` for more than one env when the compiled extension is there,
  ``"inprocess"`` otherwise (``choose_backend``). On 8 tabletop envs the worker processes step 1.6-1.7x
  as fast as gymnasium's AsyncVectorEnv, the in-process loop 0.7x (benchmarks/RESULTS.md).

``VectorEnv(...)`` picks the class and Python runs that class's ``__init__`` once, so the result is an
instance of ``VectorEnv`` and of the chosen backend's class; ``backend`` and ``backend_reason`` say
which was chosen and why.

Auto-reset: when an env's episode ends inside ``step``, it is reset at once; the returned
observation is the new episode's first, and ``info["final_obs"]`` holds the last observation
of the finished episode (needed to bootstrap the value at a time-limit truncation).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import numpy as np

BACKENDS = ("auto", "inprocess", "process")


def _stack(obs_list: list[dict]) -> dict:
    return {k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]}


def choose_backend(num_envs: int, backend: str = "auto") -> tuple[str, str]:
    """The backend ``VectorEnv`` builds for ``num_envs`` envs, and why."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown VectorEnv backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))}")
    if backend != "auto":
        return backend, f"backend={backend!r} was asked for"
    from .. import _ext   # its attribute looked up at each call, so switching it off (tests) takes effect
    if num_envs <= 1:
        return "inprocess", "auto: one env, which a worker process would only slow down (a round trip per step)"
    if not _ext.EXT_AVAILABLE:
        return "inprocess", f"auto: the compiled extension is unavailable ({_ext.EXT_ERROR})"
    return "process", f"auto: {num_envs} envs and the compiled extension: worker processes step them in parallel"


def _backend_class(name: str) -> type:
    if name == "process":
        from .process_vector import ProcessVectorEnv  # imports this module: loaded only when used
        return ProcessVectorEnv
    return InProcessVectorEnv


def _keywords(cls: type) -> list[str]:
    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind is p.KEYWORD_ONLY and n != "backend"]


def _check_keywords(cls: type, kwargs: dict, why: str) -> None:
    """Name the backend when a keyword belongs to the other one (``num_workers`` in-process, say)."""
    known = _keywords(cls)
    unknown = [k for k in kwargs if k not in known]
    if not unknown:
        return
    hint = ""
    if cls.backend == "inprocess" and all(k in _keywords(_backend_class("process")) for k in unknown):
        hint = " Those are the worker-process backend's: pass backend='process' (it needs the compiled extension)."
    raise TypeError(f"VectorEnv backend {cls.backend!r} does not take {', '.join(unknown)}; it takes "
                    f"{', '.join(known)}.{hint} (Why this backend: {why}.)")


class VectorEnv:
    """What every backend shares: construction through ``VectorEnv(env_fns, backend=...)``, per-env
    episode facts (kept in ``_instructions``, ``_task_ids``, ``_init_states``), ``step`` and
    ``step_envs`` over the backend's ``_step_ids``, ``with``-statement support and a last-chance
    ``close()`` when collected."""

    backend: str = "auto"   # each backend class names itself
    backend_reason: str = ""

    def __new__(cls, env_fns=(), *args, backend: str = "auto", **kwargs):
        if cls is VectorEnv:
            try:
                n = len(env_fns)
            except TypeError:
                raise TypeError(f"VectorEnv takes a sequence of env factories (a list); got "
                                f"{type(env_fns).__name__}") from None
            name, why = choose_backend(n, backend)
            sub = _backend_class(name)
        else:
            if backend not in ("auto", cls.backend):
                raise ValueError(f"{cls.__name__} is the {cls.backend!r} backend, not {backend!r}; build "
                                 f"VectorEnv(env_fns, backend={backend!r}) instead")
            sub, why = cls, f"{cls.__name__} was constructed"
        _check_keywords(sub, kwargs, why)
        self = super().__new__(sub)
        # type.__call__ then runs sub.__init__ (with these same arguments) exactly once
        self.backend_reason = why
        return self

    @property
    def instructions(self) -> list[str]:
        return list(self._instructions)

    @property
    def task_ids(self) -> list[str]:
        return list(self._task_ids)

    @property
    def init_states(self) -> np.ndarray:
        return self._init_states.copy()

    def _env_ids(self, env_ids) -> np.ndarray:
        ids = np.asarray(env_ids).reshape(-1)
        if len(ids) and ids.dtype.kind not in "iu":
            raise TypeError(f"env_ids must be integer env indices; got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if len(np.unique(ids)) != len(ids) or (len(ids) and (ids.min() < 0 or ids.max() >= self.num_envs)):
            raise ValueError(f"env_ids must be distinct ids in [0, {self.num_envs}); got {ids.tolist()}")
        return ids

    def step(self, actions):
        return self._step_ids(actions, np.arange(self.num_envs))

    def step_envs(self, actions, env_ids):
        """Step only envs ``env_ids`` with ``actions`` [len(env_ids), *action_shape] and wait for them: the
        synchronous ``send`` + ``recv`` of a subset. The others stay where they are (evaluation steps only
        the envs whose episode is still running). Returns ``step``'s tuple for those envs, in ``env_ids``
        order; ``info["env_id"]`` names them."""
        return self._step_ids(actions, self._env_ids(env_ids))

    def _step_ids(self, actions, ids: np.ndarray):  # pragma: no cover - every backend defines it
        raise NotImplementedError

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


# the common base's former name
VectorEnvBase = VectorEnv


class InProcessVectorEnv(VectorEnv):
    """Every env steps in the calling process, one after another."""

    backend = "inprocess"

    def __init__(self, env_fns: Sequence[Callable[[], Any]], *, reset_options: Callable[[int], dict | None] | None = None,
                 autoreset: bool = True, backend: str = "auto"):
        # (backend was consumed by VectorEnv.__new__)
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

    # ---- EnvPool-style async API ------------------------------------------------------------
    def send(self, actions, env_ids) -> None:
        self._pending.append((np.asarray(actions), self._env_ids(env_ids)))

    def recv(self):
        if not self._pending:
            raise RuntimeError("recv() called with no batch in flight: call send(actions, env_ids) first")
        actions, ids = self._pending.pop(0)
        return self._step_ids(actions, ids)

    def recv_envs(self, env_ids):
        """The results of the batch sent for exactly ``env_ids`` (stepped now, in this process)."""
        ids = self._env_ids(env_ids)
        for k, (actions, sent) in enumerate(self._pending):
            if np.array_equal(sent, ids):
                del self._pending[k]
                return self._step_ids(actions, ids)
        raise RuntimeError(f"recv_envs: no batch was sent for envs {ids.tolist()}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for env in self.envs:
            env.close()
