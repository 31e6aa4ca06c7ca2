"""Worker processes for the vectorised env manager: one or several envs per process, results in
shared memory.

Each worker runs a short loop around its envs' factories (EnvPool's layout: fewer workers than
envs, about one per core, so that the cores step envs instead of switching between processes). Per
env there is one slot of the shared
batch (vlarl_fast._C.SharedBatch): observations, the action, reward, flags and reset info are
written in place there, and the slot's state word says whose turn it is:

    IDLE --manager writes action/command, sets CMD--> CMD --worker runs it, writes results--> DONE
    DONE --manager reads the results--> IDLE

Waiting happens in C++ on futexes with the GIL released: a worker with one env sleeps on its
slot's state word; a worker with several sleeps until any of its slots holds a command and runs
every command it finds, publishing each result as soon as it is written. Rare, variable-size
messages (the spaces at start-up, reset options, an exception's traceback), each tagged with its
env id, go through a pipe per worker; the batch itself comes as a file
descriptor over that pipe (a Unix socket), so its name can be unlinked before any worker attaches
and no crash leaves an entry in /dev/shm.

An env that raises is rebuilt from its factory inside the worker (the manager then resets it on its
seed stream); the worker's other envs go on. A worker that cannot rebuild it, dies or hangs is
replaced by the manager with all of its envs.

Envs move between workers at episode boundaries (the manager balances measured step costs): the old
worker DETACHes the env and sends back what its last reset drew from (the env's RNG state before the
reset, the seed and options); the new worker builds it from the same factory and replays that
reset, so the episode the caller already sees goes on unchanged (checked: a replay that does not
reproduce the observation is reported, and the manager cuts that episode short). Each step's wall
time (env.step with its rendering) is written to the slot for the manager's cost estimate.

A worker ignores SIGINT (Ctrl-C is the manager's to handle; it then closes the workers) and asks
the kernel to kill it when its parent dies, so an interrupted or killed manager leaves nothing.
"""
from __future__ import annotations

import os
import signal
import time
import traceback

import numpy as np

# slot states
IDLE, CMD, DONE = 0, 1, 2
# commands (ctl[:, 0]); ctl[:, 1] = reset seed, ctl[:, 2] = the last step's wall time in ns
STEP, RESET, CLOSE, DETACH, ATTACH, NOP = 1, 2, 3, 4, 5, 6
CTL_SIZE = 3
# flags (uint8 per env)
F_TERM, F_TRUNC, F_SUCCESS, F_RESET, F_HAS_SEED, F_HAS_OPTIONS, F_AUTORESET, F_ERROR, F_DIVERGED = range(9)
NUM_FLAGS = 9
INSTRUCTION_BYTES, TASK_ID_BYTES = 256, 64
TEXT_BYTES = INSTRUCTION_BYTES + TASK_ID_BYTES
# how often an idle worker checks that its manager still exists (seconds)
PARENT_CHECK_S = 1.0


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel sends SIGKILL when the process that started us exits,
    # even if it was killed and had no chance to close us (Linux only; elsewhere the
    # getppid() check in the loop does the job, one PARENT_CHECK_S later).
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except Exception:
        pass


def _encode(text: str, n: int) -> np.ndarray:
    raw = str(text).encode("utf-8")[: n - 1]
    out = np.zeros(n, dtype=np.uint8)
    out[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def decode(buf: np.ndarray) -> str:
    return bytes(buf).split(b"\0", 1)[0].decode("utf-8", errors="replace")


def send_batch(conn, batch, pid: int) -> None:
    """Manager side: hand a worker the batch through its descriptor (works after the name is gone)."""
    from multiprocessing.reduction import send_handle
    conn.send(("batch",))
    send_handle(conn, batch.fileno(), pid)


def _receive_batch(conn):
    from multiprocessing.reduction import recv_handle

    from vlarl_fast._C import SharedBatch
    fd = recv_handle(conn)
    try:
        return SharedBatch.attach_fd(fd)  # keeps its own descriptor
    finally:
        os.close(fd)


class _Slot:
    """One env's views of the shared batch (no copies: writes land in shared memory)."""

    def __init__(self, batch, index: int, obs_keys: list[str]):
        self.batch, self.i = batch, index
        # (key, view) pairs built once: the per-step path allocates no dicts of views
        self.obs = [(k, batch.slot(k, index)) for k in obs_keys]
        self.final = [(k, batch.slot("final_" + k, index)) for k in obs_keys]
        self.action = batch.slot("action", index)
        self.reward = batch.slot("reward", index)
        self.flags = batch.slot("flags", index)
        self.ctl = batch.slot("ctl", index)
        self.init_state = batch.slot("init_state", index)
        self.text = batch.slot("text", index)

    def write_obs(self, obs: dict, dest: list) -> None:
        for k, view in dest:
            v = np.asarray(obs[k])
            if v.shape != view.shape:
                raise ValueError(f"observation {k!r} has shape {v.shape} but its shared-memory slot holds "
                                 f"{view.shape} (the shape the env's observation_space declared); "
                                 "make the env return observations of its declared shape")
            np.copyto(view, v, casting="same_kind")

    def write_reset_info(self, info: dict) -> None:
        self.init_state[...] = int(info.get("init_state", -1))
        self.text[:INSTRUCTION_BYTES] = _encode(info.get("instruction", ""), INSTRUCTION_BYTES)
        self.text[INSTRUCTION_BYTES:] = _encode(info.get("task_id", ""), TASK_ID_BYTES)
        self.flags[F_RESET] = 1


class _Inbox:
    """The worker's end of its pipe: messages for one env, taken in order, others kept for later."""

    def __init__(self, conn):
        self.conn = conn
        self.kept: dict[int, list] = {}

    def _receive(self) -> int:
        i, msg = self.conn.recv()
        self.kept.setdefault(i, []).append(msg)
        return i

    def take(self, env: int):
        while not self.kept.get(env):
            self._receive()
        return self.kept[env].pop(0)

    def arrived(self) -> list[int]:
        """Receive whatever is waiting (no blocking); the env ids that have messages kept."""
        while self.conn.poll(0):
            self._receive()
        return [i for i, msgs in self.kept.items() if msgs]


def rng_state(env):
    """The env's gymnasium RNG state (None if it has none yet): what an unseeded reset draws from."""
    rng = getattr(getattr(env, "unwrapped", env), "_np_random", None)
    return None if rng is None else rng.bit_generator.state


def set_rng_state(env, state) -> None:
    if state is None:
        return
    bit_gen = getattr(np.random, state["bit_generator"])()
    bit_gen.state = state
    getattr(env, "unwrapped", env)._np_random = np.random.Generator(bit_gen)


def _render_note(exc: BaseException) -> str:
    """For a renderer failure: the device and rendering variables of this worker, and the fix."""
    from .render_devices import gpu_memory, is_render_error, render_failure_note
    if not is_render_error(exc):
        return ""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return "\n" + render_failure_note(os.environ, gpu_memory(gpu) if gpu.startswith("GPU-") else None)


def _build(fn_bytes: bytes):
    import cloudpickle
    return cloudpickle.loads(fn_bytes)()


def worker_main(env_ids: list[int], fn_bytes: list[bytes], conn, env_vars: dict) -> None:
    """Entry point of a worker process serving the slots `env_ids` (spawned: module level, importable)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    parent = os.getppid()
    # before the factories run: llvmpipe and MuJoCo's EGL read these when the first context is made
    os.environ.update({k: str(v) for k, v in env_vars.items()})
    envs: dict[int, object] = {}
    try:
        for i, fb in zip(env_ids, fn_bytes):
            try:
                envs[i] = _build(fb)
            except BaseException as e:
                conn.send(("error", i, f"env factory {i} failed to build the env:\n{traceback.format_exc()}"
                           f"{_render_note(e)}"))
                return
        conn.send(("spaces", [(envs[i].observation_space, envs[i].action_space) for i in env_ids]))
        if conn.recv()[0] != "batch":
            return
        batch = _receive_batch(conn)
        keys = list(envs[env_ids[0]].observation_space.spaces)
        factories = dict(zip(env_ids, fn_bytes))
        _Server(batch, envs, keys, factories, _Inbox(conn), conn, parent).serve()
    finally:
        for env in envs.values():
            try:
                env.close()
            except Exception:
                pass


class _Server:
    """The serving loop of one worker process: the envs it holds (they may come and go), their slots,
    and what each one's last reset drew from (so that it can move to another worker)."""

    def __init__(self, batch, envs: dict, keys: list[str], factories: dict, inbox: _Inbox, conn, parent: int):
        self.batch, self.envs, self.keys, self.factories = batch, envs, keys, factories
        self.inbox, self.conn, self.parent = inbox, conn, parent
        self.slots = {i: _Slot(batch, i, keys) for i in envs}
        self.last_reset: dict[int, tuple] = {}  # env id -> (rng state before it, seed, options)
        self._ids = np.array(sorted(self.slots), dtype=np.int64)

    def _slots_changed(self) -> None:
        self._ids = np.array(sorted(self.slots), dtype=np.int64)

    def commands(self) -> list[int]:
        if len(self._ids) == 1:  # sleep on the slot's own word: only a command for it wakes us
            one = int(self._ids[0])
            return [one] if self.batch.wait(one, CMD, timeout=PARENT_CHECK_S) else []
        # woken by any state change, re-scans in C++; returns the commands oldest first
        return self.batch.wait_slots(self._ids, CMD, min_count=1, timeout=PARENT_CHECK_S).tolist()

    def serve(self) -> None:
        while True:
            ready = self.commands() if self.slots else self._idle_wait()
            if not ready and os.getppid() != self.parent:
                return
            for i in ready:
                slot = self.slots[i]
                cmd = int(slot.ctl[0])
                if cmd == CLOSE:
                    self.batch.set_state(i, DONE)
                    return
                if not self._run_guarded(i, slot, cmd):
                    return  # the manager replaces this worker
            # envs announced for this worker: their slots hold an ATTACH (or soon will). The manager
            # wakes us for it with a NOP on one of our idle slots, else we look after each command
            for i in self.inbox.arrived():
                first = self.inbox.kept[i][0]
                if i not in self.slots and isinstance(first, tuple) and first[:1] == ("attach",):
                    self.slots[i] = _Slot(self.batch, i, self.keys)
                    self._slots_changed()

    def _idle_wait(self) -> list[int]:
        # no env of our own: wait on the pipe (an attach message comes before its command)
        self.conn.poll(PARENT_CHECK_S)
        return []

    def _run_guarded(self, i: int, slot: _Slot, cmd: int) -> bool:
        try:
            if cmd == DETACH:
                self._detach(i, slot)
            elif cmd == ATTACH:
                self._attach(i, slot)
            elif cmd != NOP:  # a NOP only wakes us (to read the pipe)
                self._run(i, slot, cmd)
        except BaseException:
            self.conn.send(("error", i, f"env {i} raised:\n{traceback.format_exc()}"))
            slot.flags[F_ERROR] = 1
            try:  # a fresh env from the same factory; the manager resets it on its seed stream
                self.envs.pop(i).close()
            except Exception:
                pass
            try:
                self.envs[i] = _build(self.factories[i])
            except BaseException as e:
                self.conn.send(("error", i, f"env factory {i} failed to rebuild the env:\n{traceback.format_exc()}"
                                f"{_render_note(e)}"))
                self.batch.set_state(i, DONE)
                return False
        self.batch.set_state(i, DONE)
        return True

    def _detach(self, i: int, slot: _Slot) -> None:
        """Hand env i over: its factory and last reset go to the manager, the env is closed."""
        env = self.envs.pop(i)
        self.conn.send(("detached", i, (self.factories.pop(i), self.last_reset.pop(i, None))))
        del self.slots[i]
        self._slots_changed()
        try:
            env.close()
        except Exception:
            pass
        slot.flags[:] = 0

    def _attach(self, i: int, slot: _Slot) -> None:
        """Take env i over: build it, replay its last reset, check the observation it gives."""
        _, fn_bytes, last = self.inbox.take(i)
        slot.flags[:] = 0
        self.factories[i] = fn_bytes
        self.envs[i] = env = _build(fn_bytes)
        if last is None:
            return
        state, seed, options = last
        set_rng_state(env, state)
        self.last_reset[i] = last
        obs, info = env.reset(seed=seed, options=options)
        if not all(np.array_equal(np.asarray(obs[k]), view) for k, view in slot.obs):
            slot.write_obs(obs, slot.obs)
            slot.write_reset_info(info)
            slot.flags[F_DIVERGED] = 1

    def _reset(self, i: int, env, seed, options):
        self.last_reset[i] = (rng_state(env), seed, options)
        return env.reset(seed=seed, options=options)

    def _run(self, i: int, slot: _Slot, cmd: int) -> None:
        env, flags = self.envs[i], slot.flags
        if cmd == RESET:
            seed = int(slot.ctl[1]) if flags[F_HAS_SEED] else None
            options = self.inbox.take(i) if flags[F_HAS_OPTIONS] else None
            flags[:] = 0
            obs, info = self._reset(i, env, seed, options)
            slot.write_obs(obs, slot.obs)
            slot.write_reset_info(info)
            return
        if cmd != STEP:
            raise RuntimeError(f"unknown worker command {cmd}")
        autoreset = bool(flags[F_AUTORESET])
        flags[:] = 0
        t0 = time.perf_counter_ns()
        # the shared action itself, not a copy: the manager writes the next one only after this
        # step's result is published (tabletop and gymnasium envs copy or clip what they keep)
        obs, r, term, trunc, info = env.step(slot.action)
        slot.ctl[2] = time.perf_counter_ns() - t0
        slot.reward[...] = r
        flags[F_TERM], flags[F_TRUNC], flags[F_SUCCESS] = bool(term), bool(trunc), bool(info.get("success", False))
        if term or trunc:
            slot.write_obs(obs, slot.final)
            if autoreset:
                obs, rinfo = self._reset(i, env, None, None)
                slot.write_reset_info(rinfo)
        slot.write_obs(obs, slot.obs)
