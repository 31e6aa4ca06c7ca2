"""``ProcessVectorEnv`` (``VectorEnv(..., backend="process")``): ``VectorEnv``'s interface, with the
envs stepped in worker processes (by default one per core, each serving several envs, as EnvPool's
threads do).

Same semantics as ``vector.InProcessVectorEnv`` (same-step auto-reset, ``info["final_obs"]``,
``reset_options``, ``reset_env``, ``observations``), checked step by step against it in
tests/test_workers.py. Observations, rewards and flags come back through a shared-memory batch
(see workers.py); the manager only copies the rows it returns. The batch's name is unlinked as
soon as it exists: workers get it through a file descriptor, so nothing is left in /dev/shm even
if the manager is killed.

Per step, the manager's work is a fixed number of calls whatever the number of envs: actions,
flags and commands are written with numpy row assignments, ``SharedBatch.set_states`` starts every
env in one call, ``SharedBatch.wait_slots`` sleeps (GIL released) until the envs it waits for have
finished and is woken once, not per env, and results are gathered with numpy fancy indexing. Per-
env Python runs only at episode ends, restarts and resets.

Asynchronous use (EnvPool style): ``send(actions, env_ids)`` starts those envs and returns at
once; ``recv()`` waits for the first ``batch_size`` envs in flight to finish (all of them when
``batch_size`` is None) and returns their results, with ``info["env_id"]`` saying which.

Load balancing: workers time each env.step (rendering included); when the workers' measured loads
drift apart, envs move to less loaded workers at their next episode start, following
balance.plan_rebalance. The new worker replays the env's last reset (same RNG state, seed and
options), so moves are invisible to the caller (see workers.py).

Recovery: an env that raises is rebuilt from its factory inside its worker; a worker that dies
(signal, segfault) or exceeds ``step_timeout`` is replaced, with fresh envs from the same factories.
Each env affected is reset with the next seed of its seed stream, and its step comes back
``truncated`` with ``info["worker_restarted"]`` set (an env that was idle when its worker died
reports so at its next step). Envs of other workers, and a raising env's worker-mates, are not
touched.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from . import workers as W
from .vector import VectorEnv

# a worker whose env keeps failing right after a restart is a bug, not bad luck
MAX_CONSECUTIVE_RESTARTS = 3
# seed stream of a restarted env: its last explicit reset seed + this x restarts
RESTART_SEED_STRIDE = 1_000_003
# step costs: weight of the newest step in each env's running average, and the steps every env
# needs before envs move between workers
COST_EMA = 0.02
MIN_COST_SAMPLES = 32
_WAIT_SLICE_S = 0.05


class WorkerError(RuntimeError):
    pass


def _batch_fields(obs_space, action_space, num_envs: int) -> dict:
    from gymnasium import spaces
    if not isinstance(obs_space, spaces.Dict) or not all(isinstance(s, spaces.Box) for s in obs_space.spaces.values()):
        raise TypeError(f"ProcessVectorEnv needs a Dict observation space of Box entries; got {obs_space}")
    if not isinstance(action_space, spaces.Box):
        raise TypeError(f"ProcessVectorEnv needs a Box action space; got {action_space}")
    if len(obs_space.spaces) > 5:
        raise TypeError("ProcessVectorEnv supports at most 5 observation entries (the batch holds 16 fields)")
    fields = {}
    for k, s in obs_space.spaces.items():
        fields[k] = (s.dtype, s.shape or (1,))
        fields["final_" + k] = (s.dtype, s.shape or (1,))
    fields.update(action=(action_space.dtype, action_space.shape), reward=("float64", ()),
                  flags=("uint8", (W.NUM_FLAGS,)), ctl=("int64", (W.CTL_SIZE,)), init_state=("int64", ()),
                  text=("uint8", (W.TEXT_BYTES,)))
    return fields


def _reorder(result: tuple, order: np.ndarray) -> tuple:
    """A step result (obs, rewards, terminated, truncated, info) with its rows taken in ``order``."""
    obs, rew, term, trunc, info = result
    take = (lambda v: v[order] if isinstance(v, np.ndarray) else [v[i] for i in order])
    info = {k: ({kk: vv[order] for kk, vv in v.items()} if isinstance(v, dict) else take(v)) for k, v in info.items()}
    return {k: v[order] for k, v in obs.items()}, rew[order], term[order], trunc[order], info


def default_num_workers(num_envs: int) -> int:
    """One worker per usable core (never more than envs): more processes than cores only trade
    stepping for context switches."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(num_envs, cores))


class _Worker:
    def __init__(self, ctx, index: int, env_ids: list[int], fn_bytes: list[bytes], env_vars: dict):
        self.env_ids = env_ids
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=W.worker_main, args=(env_ids, fn_bytes, child, env_vars),
                                name=f"vlarl-env-worker-{index}", daemon=True)
        self.proc.start()
        child.close()
        self._errors: dict[int, list[str]] = {}
        self._detached: dict[int, tuple] = {}

    def handshake(self, timeout: float) -> list:
        if not self.conn.poll(timeout):
            raise WorkerError(f"worker {self.proc.name} sent nothing within {timeout:.0f} s of starting")
        try:
            msg = self.conn.recv()
        except EOFError:
            raise WorkerError(f"worker {self.proc.name} exited while building its envs "
                              f"(exit code {self.proc.exitcode})") from None
        if msg[0] == "error":
            raise WorkerError(msg[2])
        return msg[1]

    def _drain(self) -> None:
        try:
            while self.conn.poll(0):
                msg = self.conn.recv()
                if msg[0] == "error":
                    self._errors.setdefault(msg[1], []).append(msg[2])
                elif msg[0] == "detached":
                    self._detached[msg[1]] = msg[2]
        except (EOFError, OSError):
            pass

    def take_detached(self, env: int) -> tuple:
        """(factory, last reset) of an env this worker has just handed over (sent before its DONE)."""
        self._drain()
        return self._detached.pop(env)

    def take_errors(self, env: int) -> list[str]:
        """The error reports about `env` (sent before its failed result was published)."""
        self._drain()
        return self._errors.pop(env, [])

    def error_message(self) -> str:
        self._drain()
        reports = [m for ms in self._errors.values() for m in ms]
        if reports:
            return reports[-1]
        code = self.proc.exitcode
        if code is not None and code < 0:
            return f"worker killed by signal {-code}"
        return f"worker exited with code {code}" if code is not None else "worker timed out"

    def send_batch(self, batch) -> None:
        W.send_batch(self.conn, batch, self.proc.pid)

    def stop(self, timeout: float = 2.0) -> None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        self.conn.close()


def _shutdown(workers: list, batch) -> None:
    """Close everything: ask each worker to exit, then kill stragglers, then unlink the batch."""
    if batch is not None and not batch.closed:
        for w in workers:
            if w is not None and w.proc.is_alive():
                i = w.env_ids[0]  # a CLOSE in any of its slots ends a worker
                batch.slot("ctl", i)[0] = W.CLOSE
                batch.set_state(i, W.CMD)
    for w in workers:
        if w is not None:
            w.stop()
    if batch is not None and not batch.closed:
        batch.close()


class ProcessVectorEnv(VectorEnv):
    backend = "process"

    def __init__(self, env_fns: Sequence[Callable[[], Any]], *, reset_options: Callable[[int], dict | None] | None = None,
                 autoreset: bool = True, batch_size: int | None = None, step_timeout: float | None = 300.0,
                 start_method: str = "spawn", start_timeout: float = 120.0, worker_env: Sequence[dict] | dict | None = None,
                 render_devices: Sequence[int] | str | None = "auto", num_workers: int | None = None,
                 rebalance: bool = True, rebalance_min_gain: float = 0.1, backend: str = "auto"):
        # (backend was consumed by VectorEnv.__new__)
        from .._ext import require_ext
        C = require_ext()
        import cloudpickle
        if not env_fns:
            raise ValueError("VectorEnv needs at least one env factory")
        self.num_envs = n = len(env_fns)
        self.reset_options, self.autoreset = reset_options, autoreset
        self.batch_size, self.step_timeout, self.start_timeout = batch_size, step_timeout, start_timeout
        self._ctx = mp.get_context(start_method)
        self._fn_bytes = [cloudpickle.dumps(fn) for fn in env_fns]
        self.num_workers = nw = default_num_workers(n) if num_workers is None else int(num_workers)
        if not 1 <= nw <= n:
            raise ValueError(f"num_workers must be between 1 and the number of envs ({n}); got {num_workers}")
        # env i is served by worker i % num_workers: any contiguous group of envs (an async half,
        # say) is spread over every worker
        self._owner = np.arange(n) % nw
        self._worker_envs = [np.flatnonzero(self._owner == w) for w in range(nw)]
        if worker_env is None or isinstance(worker_env, dict):
            worker_env = [dict(worker_env or {})] * nw
        if len(worker_env) != nw:
            raise ValueError(f"worker_env holds {len(worker_env)} dicts for {nw} workers")
        # render devices (render_devices.parse_render_device): "auto" = the visible GPUs that have an EGL
        # device, spread evenly (else the CPU); "cpu" (or None) = Mesa; "cuda", "cuda:0,cuda:2" or CUDA
        # ordinals = those GPUs. Each worker gets its GPU's EGL index and CUDA_VISIBLE_DEVICES=<its UUID>.
        from .render import user_mujoco_gl
        from .render_devices import worker_render_vars
        render = worker_render_vars(render_devices, nw, mujoco_gl=user_mujoco_gl())
        # llvmpipe otherwise spreads each render over every core, fighting the other workers
        self._worker_env = [{"LP_NUM_THREADS": "1", **r, **e} for r, e in zip(render, worker_env)]
        self._workers: list[_Worker | None] = [None] * nw
        self.batch = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, None)
        try:
            for w in range(nw):
                self._workers[w] = self._new_worker(w)
            spaces: list = [None] * n
            for w, wk in enumerate(self._workers):
                for i, sp in zip(self._worker_envs[w], wk.handshake(start_timeout)):
                    spaces[i] = sp
            self.single_observation_space, self.single_action_space = spaces[0]
            for i, (o, a) in enumerate(spaces[1:], 1):
                if o != spaces[0][0] or a != spaces[0][1]:
                    raise ValueError(f"env {i} has spaces ({o}, {a}) but env 0 has {spaces[0]}; "
                                     "all envs of one VectorEnv must share their spaces")
            self.batch = C.SharedBatch.create(None, n, _batch_fields(*spaces[0], n))
            # from here on no crash can leave the name behind; workers attach through the descriptor
            self.batch.unlink()
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _shutdown, self._workers, self.batch)
            for w in self._workers:
                w.send_batch(self.batch)
        except BaseException:
            self.close()
            raise
        self._obs_keys = list(self.single_observation_space.spaces)
        self._obs_shapes = {k: s.shape for k, s in self.single_observation_space.spaces.items()}
        b = self.batch
        self._a = {k: b.array(k) for k in b.fields}
        self._instructions = [""] * n
        self._task_ids = [""] * n
        self._init_states = np.zeros(n, dtype=np.int64)
        self._ep_return = np.zeros(n, dtype=np.float64)
        self._ep_len = np.zeros(n, dtype=np.int64)
        self._seeds: list[int | None] = [None] * n
        self._restarts = np.zeros(n, dtype=np.int64)
        self._consecutive = np.zeros(n, dtype=np.int64)
        self._busy = np.zeros(n, dtype=bool)  # in flight: started, result not yet returned
        self._started = np.zeros(n, dtype=np.float64)  # time.monotonic() when each was started
        self._failed: dict[int, str] = {}  # env id -> why its worker was restarted (not yet reported)
        self._lost_idle: dict[int, str] = {}  # the same for envs that were idle: reported at their next step
        self._lost_stats: dict[int, tuple[float, int]] = {}
        # measured seconds per env.step (rendering included): an average over the last ~1/COST_EMA steps
        self._cost = np.zeros(n, dtype=np.float64)
        self._cost_n = np.zeros(n, dtype=np.int64)
        self.rebalance, self.rebalance_min_gain = rebalance and nw > 1, rebalance_min_gain
        self.moves = 0
        self._plan: list[int] | None = None  # the worker each env is to move to, at its next episode start

    def _new_worker(self, w: int) -> _Worker:
        from .render_devices import release_cached_gpu_memory
        release_cached_gpu_memory([self._worker_env[w]])  # at the start and at each restart
        ids = self._worker_envs[w].tolist()
        return _Worker(self._ctx, w, ids, [self._fn_bytes[i] for i in ids], self._worker_env[w])

    # ---- dispatch and collection -------------------------------------------------------------
    def _obs_rows(self, ids, prefix: str = "") -> dict:
        return {k: self._a[prefix + k][ids].reshape((len(ids),) + self._obs_shapes[k]) for k in self._obs_keys}

    def _start(self, i: int, cmd: int, *, seed: int | None = None, options: dict | None = None) -> None:
        flags, ctl = self._a["flags"][i], self._a["ctl"][i]
        flags[:] = 0
        ctl[0] = cmd
        if cmd == W.RESET:
            flags[W.F_HAS_SEED] = seed is not None
            ctl[1] = 0 if seed is None else int(seed)
            if options is not None:
                flags[W.F_HAS_OPTIONS] = 1
                self._workers[self._owner[i]].conn.send((i, options))
        else:
            flags[W.F_AUTORESET] = self.autoreset and self.reset_options is None
        self._started[i] = time.monotonic()
        self._busy[i] = True
        self.batch.set_state(i, W.CMD)

    def _start_steps_one_by_one(self, ids: np.ndarray) -> None:
        """The readable twin of _start_steps (tests/test_workers.py runs both against in-process)."""
        for i in ids:
            self._start(int(i), W.STEP)

    def _start_steps(self, ids: np.ndarray) -> None:
        """_start(i, STEP) for every id at once (actions already in place)."""
        flags = self._a["flags"]
        flags[ids] = 0
        # with reset_options the manager resets (it must call reset_options(i) at episode end)
        flags[ids, W.F_AUTORESET] = self.autoreset and self.reset_options is None
        self._a["ctl"][ids, 0] = W.STEP
        self._started[ids] = time.monotonic()
        self._busy[ids] = True
        self.batch.set_states(ids, W.CMD)

    def _wait(self, ids: Sequence[int], count: int) -> list[int]:
        """Wait until `count` of `ids` have finished (DONE, or restarted after a failure, which is
        recorded in self._failed). Returns the finished ids, restarted ones first, then in the order
        they finished (possibly more than `count`); they stay in flight until _finish."""
        pending = np.asarray(ids, dtype=np.int64)
        done: list[int] = []
        while True:
            if self._failed:
                restarted = [i for i in pending.tolist() if i in self._failed]
                if restarted:
                    done += restarted
                    pending = pending[~np.isin(pending, restarted)]
            if len(done) >= count:
                return done
            ready = self.batch.wait_slots(pending, W.DONE, min_count=count - len(done), timeout=_WAIT_SLICE_S)
            if len(ready):
                failed = self._a["flags"][ready, W.F_ERROR] != 0
                ok = ready[~failed]
                self._consecutive[ok] = 0
                done += ok.tolist()
                pending = pending[~np.isin(pending, ok)]
                for i in ready[failed].tolist():
                    self._env_failed(i)  # marks it (and, if its worker went, its worker-mates) failed
            elif len(pending):
                self._recover_lost(pending)

    def _env_failed(self, i: int) -> None:
        """Env i published a failed result: its worker rebuilt it (reset it on its seed stream here),
        or could not and exits (replace the worker)."""
        w = int(self._owner[i])
        reports = self._workers[w].take_errors(i)
        why = reports[0] if reports else "env failed"
        if len(reports) > 1 or not self._workers[w].proc.is_alive():
            self._restart_worker(w, reports[-1] if reports else why)
            return
        self._count_failure([i], why, f"env {i} restarted in its worker")
        self.batch.set_state(i, W.IDLE)
        self._reset_lost([i])
        self._mark_lost(i, why)

    def _recover_lost(self, pending: np.ndarray) -> None:
        """Replace the workers of `pending` envs that died or overran step_timeout."""
        now = time.monotonic()
        for w in np.unique(self._owner[pending]).tolist():
            mine = pending[self._owner[pending] == w]
            unfinished = mine[self.batch.states()[mine] != W.DONE]
            if not len(unfinished):
                continue
            alive = self._workers[w].proc.is_alive()
            late = self.step_timeout is not None and bool((now - self._started[unfinished] > self.step_timeout).any())
            if not alive or late:
                self._restart_worker(w, "step timed out" if late and alive else None, timed_out=late and alive)

    def _count_failure(self, ids, why: str, what: str) -> None:
        for i in ids:
            # episode statistics up to the last completed step, reported with the truncated step
            self._lost_stats[i] = (float(self._ep_return[i]), int(self._ep_len[i]))
            self._consecutive[i] += 1
            if self._consecutive[i] > MAX_CONSECUTIVE_RESTARTS:
                raise WorkerError(f"env {i} failed {MAX_CONSECUTIVE_RESTARTS + 1} times in a row; last failure: {why}")
            self._restarts[i] += 1
        warnings.warn(f"{what} ({why.strip().splitlines()[-1]}); its episode is cut short" if len(ids) == 1 else
                      f"{what} ({why.strip().splitlines()[-1]}); the episodes of envs {list(ids)} are cut short",
                      RuntimeWarning, stacklevel=5)

    def _restart_worker(self, w: int, why: str | None = None, timed_out: bool = False) -> None:
        """Replace worker w by a fresh one with the same factories; reset its envs on their seed streams."""
        old = self._workers[w]
        if timed_out:
            old.proc.kill()
        old.proc.join(5.0)
        why = why or old.error_message()
        old.stop(0.5)
        envs = self._worker_envs[w].tolist()
        self._count_failure(envs, why, f"env worker {w} restarted")
        # before the new worker attaches: it must not find stale commands in its slots
        self.batch.set_states(self._worker_envs[w], W.IDLE)
        self._workers[w] = new = self._new_worker(w)
        new.handshake(self.start_timeout)
        new.send_batch(self.batch)
        self._reset_lost(envs)  # every env of the worker at once
        for i in envs:
            self._mark_lost(i, why)

    def _reset_lost(self, ids: list[int]) -> None:
        """Reset envs whose episode was lost, each with the next seed of its seed stream."""
        seeds = [None if self._seeds[i] is None else self._seeds[i] + RESTART_SEED_STRIDE * int(self._restarts[i])
                 for i in ids]
        opts = [self.reset_options(i) if self.reset_options is not None else None for i in ids]
        self._reset_many(ids, seeds, opts)

    def _mark_lost(self, i: int, why: str) -> None:
        # an env in flight reports its restart when its result is collected; an idle one at its next step
        if self._busy[i]:
            self._failed[i] = why
        else:
            self._lost_idle[i] = why

    def _reset_now(self, i: int, seed, options) -> None:
        self._reset_many([i], [seed], [options])

    def _reset_many(self, ids: list[int], seeds: list, options: list) -> None:
        """Reset envs `ids` together (every worker resets its share at once) and read their reset info."""
        ids_arr = np.asarray(ids, dtype=np.int64)
        # a restart resets an env that is still in flight: it stays so until its step is returned
        in_flight = self._busy[ids_arr].copy()
        for i, seed, opts in zip(ids, seeds, options):
            self._start(i, W.RESET, seed=seed, options=opts)
        self._wait(ids_arr, len(ids))
        self._busy[ids_arr] = in_flight
        for i in ids:
            if self._failed.pop(i, None) is None:  # else a restart has reset it and read its info
                self._read_reset_info(i)
                self.batch.set_state(i, W.IDLE)

    def _read_reset_info(self, i: int) -> None:
        text = self._a["text"][i]
        self._instructions[i] = W.decode(text[:W.INSTRUCTION_BYTES])
        self._task_ids[i] = W.decode(text[W.INSTRUCTION_BYTES:])
        self._init_states[i] = self._a["init_state"][i]
        self._ep_return[i] = 0.0
        self._ep_len[i] = 0

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this VectorEnv is closed")

    # ---- helpers of the in-process VectorEnv's interface ------------------------------------
    def reset_env(self, i: int, seed: int | None = None, options: dict | None = None) -> dict:
        """Reset one env (e.g. to a chosen initial state); returns its first observation."""
        self._check_open()
        if self._busy[i]:
            raise RuntimeError(f"env {i} is still stepping: recv() its result before resetting it")
        if options is None and self.reset_options is not None:
            options = self.reset_options(i)
        if seed is not None:
            self._seeds[i] = int(seed)
        self._lost_idle.pop(i, None)  # its lost episode is replaced by this one anyway
        self._reset_now(i, seed, options)
        return {k: v[0] for k, v in self._obs_rows([i]).items()}

    def observations(self, ids) -> dict:
        """Current observations of the given envs, stacked (a copy)."""
        return self._obs_rows(np.asarray(ids, dtype=np.int64))

    @property
    def restarts(self) -> np.ndarray:
        """How many times each env's worker was restarted."""
        return self._restarts.copy()

    @property
    def in_flight(self) -> np.ndarray:
        """Ids of the envs sent and not yet received."""
        return np.flatnonzero(self._busy)

    @property
    def worker_pids(self) -> list[int]:
        """Process id of each worker (worker w starts with envs w, w + num_workers, ...; see env_workers)."""
        return [w.proc.pid for w in self._workers if w is not None]

    @property
    def env_workers(self) -> np.ndarray:
        """Index of the worker serving each env."""
        return self._owner.copy()

    # ---- gymnasium vector API ----------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int] | None = None, options: dict | None = None):
        self._check_open()
        if self._busy.any():  # results nobody asked for any more
            busy = self.in_flight
            self._wait(busy, len(busy))
            self.batch.set_states(busy[self.batch.states()[busy] == W.DONE], W.IDLE)
            self._busy[:] = False
            self._failed.clear()
        self._lost_idle.clear()
        n = self.num_envs
        if seed is None or isinstance(seed, (int, np.integer)):
            seeds = [None if seed is None else int(seed) + i for i in range(n)]
        else:
            seeds = list(seed)
            if len(seeds) != n:
                raise ValueError(f"reset got {len(seeds)} seeds for {n} envs")
        per_env = options.get("per_env") if options else None
        opts = []
        for i in range(n):  # reset_options(i) in env order, as the in-process VectorEnv calls it
            o = per_env[i] if per_env else None
            opts.append(self.reset_options(i) if o is None and self.reset_options is not None else o)
            if seeds[i] is not None:
                self._seeds[i] = int(seeds[i])
        self._reset_many(list(range(n)), seeds, opts)
        ids = np.arange(n)
        return self._obs_rows(ids), self._info(ids)

    def _info(self, ids: np.ndarray) -> dict:
        return {"env_id": ids, "instruction": [self._instructions[i] for i in ids],
                "task_id": [self._task_ids[i] for i in ids], "init_state": self._init_states[ids]}

    def _check_actions(self, actions, ids: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions)
        expected = (len(ids),) + tuple(self.single_action_space.shape)
        if actions.shape != expected:
            raise ValueError(f"actions must have shape {expected} (one {self.single_action_space.shape} action "
                             f"per env); got {actions.shape}")
        if not np.can_cast(actions.dtype, self.single_action_space.dtype, casting="same_kind"):
            raise TypeError(f"actions must be numbers castable to {self.single_action_space.dtype}; got {actions.dtype}")
        if len(np.unique(ids)) != len(ids) or (len(ids) and (ids.min() < 0 or ids.max() >= self.num_envs)):
            raise ValueError(f"env_ids must be distinct ids in [0, {self.num_envs}); got {ids.tolist()}")
        if self._busy[ids].any():
            raise RuntimeError(f"envs {ids[self._busy[ids]].tolist()} are still stepping: recv() their results "
                               "before sending them actions")
        return actions

    def _dispatch(self, actions, ids: np.ndarray) -> None:
        self._check_open()
        actions = self._check_actions(actions, ids)
        self._a["action"][ids] = actions  # same-kind cast checked above
        if self._lost_idle:  # their worker died while they were idle: nothing to step, report the restart
            lost = [i for i in ids.tolist() if i in self._lost_idle]
            for i in lost:
                self._failed[i] = self._lost_idle.pop(i)
                self._busy[i] = True
            ids = ids[~np.isin(ids, lost)]
        self._start_steps(ids)

    def _collect(self, ids: np.ndarray, restarted: dict[int, str]):
        """Results of finished envs `ids` (each DONE or restarted), in the in-process layout."""
        a = self._a
        flags = a["flags"][ids]
        rewards = a["reward"][ids].astype(np.float32)
        terminated = flags[:, W.F_TERM].astype(bool)
        truncated = flags[:, W.F_TRUNC].astype(bool)
        success = flags[:, W.F_SUCCESS].astype(bool)
        reset_in_worker = flags[:, W.F_RESET].astype(bool)
        was_restarted = np.isin(ids, list(restarted)) if restarted else np.zeros(len(ids), dtype=bool)
        rewards[was_restarted] = 0.0
        terminated[was_restarted] = False
        success[was_restarted] = False
        truncated[was_restarted] = True
        final_task, final_init = [self._task_ids[i] for i in ids], self._init_states[ids].copy()
        done = terminated | truncated
        final_obs = self._obs_rows(ids, "final_") if done.any() else None
        ok_ids = ids[~was_restarted]
        self._measure(ok_ids)
        self._ep_return[ok_ids] += a["reward"][ok_ids]
        self._ep_len[ok_ids] += 1
        ended = done & ~was_restarted
        ep_ret = np.where(ended, self._ep_return[ids], 0.0).astype(np.float32)
        ep_len = np.where(ended, self._ep_len[ids], 0)
        for j in np.flatnonzero(was_restarted):
            # the restart has reset the env already; report the episode up to its last completed step
            ep_ret[j], ep_len[j] = self._lost_stats.pop(int(ids[j]), (0.0, 0))
        to_reset, opts = [], []
        for j in np.flatnonzero(ended):  # once per episode, in env order as in-process
            i = int(ids[j])
            if reset_in_worker[j]:
                self._read_reset_info(i)
            elif self.autoreset:
                to_reset.append(i)
                opts.append(self.reset_options(i) if self.reset_options is not None else None)
        if to_reset:
            self._reset_many(to_reset, [None] * len(to_reset), opts)
        self.batch.set_states(ok_ids, W.IDLE)
        if self.rebalance and self.autoreset:  # ended envs stand at the start of a new episode
            self._rebalance(ids[ended].tolist())
        if final_obs is not None and was_restarted.any():
            # a killed worker's last observation is gone: the final obs is the fresh episode's first
            for k in self._obs_keys:
                final_obs[k][was_restarted] = a[k][ids[was_restarted]].reshape((-1,) + self._obs_shapes[k])
        obs = self._obs_rows(ids)
        if final_obs is not None:
            for k in self._obs_keys:  # envs that did not finish: final obs = current obs, as in-process
                final_obs[k][~done] = obs[k][~done]
        info = self._info(ids)
        info.update(success=success, done=done, episode_return=ep_ret, episode_length=ep_len,
                    final_task_id=final_task, final_init_state=final_init, worker_restarted=was_restarted)
        if final_obs is not None:
            info["final_obs"] = final_obs
        return obs, rewards, terminated, truncated, info

    # ---- load balancing ----------------------------------------------------------------------
    def _measure(self, ids: np.ndarray) -> None:
        t = self._a["ctl"][ids, 2] * 1e-9
        first = self._cost_n[ids] == 0
        self._cost[ids] = np.where(first, t, self._cost[ids] + COST_EMA * (t - self._cost[ids]))
        self._cost_n[ids] += 1

    def _rebalance(self, ended: list[int]) -> None:
        """Move envs that just began an episode towards a plan that balances the workers' measured
        loads (balance.plan_rebalance); a new plan is made once the last one is reached."""
        from .balance import plan_rebalance
        if not ended or self._cost_n.min() < MIN_COST_SAMPLES:
            return
        if self._plan is None:
            self._plan = plan_rebalance(self._cost, self._owner, self.num_workers, self.rebalance_min_gain)
            if self._plan is None:
                return
        for i in ended:
            if self._plan[i] != self._owner[i] and not self._busy[i] and i not in self._lost_idle:
                self._move(i, int(self._plan[i]))
        if all(p == w for p, w in zip(self._plan, self._owner)):
            self._plan = None

    def _command(self, i: int, cmd: int) -> bool:
        """Run a control command on idle env i's slot and wait for it; False if the env's worker was
        restarted meanwhile (the restart has reset the env; the report stays pending for it)."""
        self._a["flags"][i] = 0
        self._a["ctl"][i, 0] = cmd
        self._started[i] = time.monotonic()
        self._busy[i] = True
        self.batch.set_state(i, W.CMD)
        self._wait([i], 1)
        self._busy[i] = False
        if i in self._failed:
            self._lost_idle[i] = self._failed.pop(i)
            return False
        self.batch.set_state(i, W.IDLE)
        return True

    def _move(self, i: int, b: int) -> None:
        """Move env i, idle at the start of an episode, to worker b. The new worker replays the env's
        last reset from the same RNG state, seed and options, so the episode goes on unchanged."""
        a = int(self._owner[i])
        if not self._command(i, W.DETACH):
            self._lost_idle.pop(i, None)  # restarted in place, at an episode start anyway
            self._lost_stats.pop(i, None)
            return
        fn_bytes, last = self._workers[a].take_detached(i)
        self._owner[i] = b
        for w in (a, b):
            self._worker_envs[w] = np.flatnonzero(self._owner == w)
        self._workers[b].conn.send((i, ("attach", fn_bytes, last)))
        if not self._wake(b, i) or not self._command(i, W.ATTACH):
            # rebuilt (or its new worker replaced) and reset on its seed stream: a new episode, which
            # the caller gets as this step's observation
            self._lost_idle.pop(i, None)
            self._lost_stats.pop(i, None)
            return
        self.moves += 1
        if self._a["flags"][i, W.F_DIVERGED]:
            self._read_reset_info(i)  # the caller gets the replayed episode's first observation
            warnings.warn(f"env {i} did not reproduce its reset on another worker from its RNG state, seed and "
                          "options, so moving envs changes their episodes; pass rebalance=False for runs "
                          "that must be reproducible", RuntimeWarning, stacklevel=6)

    def _wake(self, w: int, incoming: int) -> bool:
        """A NOP on one of worker w's idle slots: it then reads its pipe (sleeping workers watch their
        own slots only). With none idle it looks after its current command or within a second.
        False if the worker was replaced meanwhile (its envs, the incoming one included, are reset)."""
        idle = [j for j in self._worker_envs[w].tolist()
                if j != incoming and not self._busy[j] and self.batch.state(j) == W.IDLE]
        return not idle or self._command(idle[0], W.NOP)

    @property
    def step_costs(self) -> np.ndarray:
        """Measured seconds per env.step (rendering included) of each env, averaged over recent steps."""
        return self._cost.copy()

    def _finish(self, ids: np.ndarray):
        self._busy[ids] = False
        restarted = {i: self._failed.pop(i) for i in ids.tolist() if i in self._failed} if self._failed else {}
        return self._collect(ids, restarted)

    def _step_ids(self, actions, ids):
        ids = np.asarray(ids, dtype=np.int64)
        self._dispatch(actions, ids)
        self._wait(ids, len(ids))
        return self._finish(ids)

    # ---- EnvPool-style async API -------------------------------------------------------------
    def send(self, actions, env_ids) -> None:
        """Start stepping `env_ids` with `actions` and return at once."""
        self._dispatch(actions, np.asarray(env_ids, dtype=np.int64).reshape(-1))

    def recv(self, batch_size: int | None = None):
        """Results of the first `batch_size` envs in flight to finish (default: the constructor's
        batch_size, or every env in flight), ordered by env id; ``info["env_id"]`` names them.
        Envs that finished beyond `batch_size` stay finished for the next recv()."""
        self._check_open()
        busy = self.in_flight
        if not len(busy):
            raise RuntimeError("recv() called with no batch in flight: call send(actions, env_ids) first")
        k = min(batch_size or self.batch_size or len(busy), len(busy))
        done = self._wait(busy, k)
        return self._finish(np.sort(np.asarray(done[:k], dtype=np.int64)))

    def recv_envs(self, env_ids):
        """Wait for exactly the envs ``env_ids`` (all in flight) and return their results in ``env_ids``
        order: a pipelined rollout receives one group of envs while another still steps."""
        self._check_open()
        ids = self._env_ids(env_ids)
        if not self._busy[ids].all():
            raise RuntimeError(f"recv_envs: envs {ids[~self._busy[ids]].tolist()} are not in flight; send them first")
        self._wait(ids, len(ids))
        order = np.argsort(ids)
        out = self._finish(ids[order])
        return _reorder(out, np.argsort(order))

    # ---- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer()
