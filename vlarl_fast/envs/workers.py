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

A worker ignores SIGINT (Ctrl-C is the manager's to handle; it then closes the workers) and asks
the kernel to kill it when its parent dies, so an interrupted or killed manager leaves nothing.
"""
from __future__ import annotations

import os
import signal
import traceback

import numpy as np

# slot states
IDLE, CMD, DONE = 0, 1, 2
# commands (ctl[:, 0])
STEP, RESET, CLOSE = 1, 2, 3
# flags (uint8 per env)
F_TERM, F_TRUNC, F_SUCCESS, F_RESET, F_HAS_SEED, F_HAS_OPTIONS, F_AUTORESET, F_ERROR = range(8)
NUM_FLAGS = 8
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

    def take(self, env: int):
        while not self.kept.get(env):
            i, msg = self.conn.recv()
            self.kept.setdefault(i, []).append(msg)
        return self.kept[env].pop(0)


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
            except BaseException:
                conn.send(("error", i, f"env factory {i} failed to build the env:\n{traceback.format_exc()}"))
                return
        conn.send(("spaces", [(envs[i].observation_space, envs[i].action_space) for i in env_ids]))
        if conn.recv()[0] != "batch":
            return
        batch = _receive_batch(conn)
        keys = list(envs[env_ids[0]].observation_space.spaces)
        slots = {i: _Slot(batch, i, keys) for i in env_ids}
        factories = dict(zip(env_ids, fn_bytes))
        _serve(batch, envs, slots, factories, _Inbox(conn), conn, parent)
    finally:
        for env in envs.values():
            try:
                env.close()
            except Exception:
                pass


def _serve(batch, envs: dict, slots: dict, factories: dict, inbox: _Inbox, conn, parent: int) -> None:
    ids = np.array(sorted(envs), dtype=np.int64)
    if len(ids) == 1:  # sleep on the slot's own word: only a command for it wakes us
        one = int(ids[0])
        def commands():
            return [one] if batch.wait(one, CMD, timeout=PARENT_CHECK_S) else []
    else:  # woken by any state change, re-scans in C++; returns the commands oldest first
        def commands():
            return batch.wait_slots(ids, CMD, min_count=1, timeout=PARENT_CHECK_S).tolist()
    while True:
        ready = commands()
        if not ready and os.getppid() != parent:
            return
        for i in ready:
            slot = slots[i]
            cmd = int(slot.ctl[0])
            if cmd == CLOSE:
                batch.set_state(i, DONE)
                return
            try:
                _run(envs[i], slot, cmd, inbox, i)
            except BaseException:
                conn.send(("error", i, f"env {i} raised:\n{traceback.format_exc()}"))
                slot.flags[F_ERROR] = 1
                try:  # a fresh env from the same factory; the manager resets it on its seed stream
                    envs.pop(i).close()
                except Exception:
                    pass
                try:
                    envs[i] = _build(factories[i])
                except BaseException:
                    conn.send(("error", i, f"env factory {i} failed to rebuild the env:\n{traceback.format_exc()}"))
                    batch.set_state(i, DONE)
                    return  # the manager replaces this worker
            batch.set_state(i, DONE)


def _run(env, slot: _Slot, cmd: int, inbox: _Inbox, i: int) -> None:
    flags = slot.flags
    if cmd == RESET:
        seed = int(slot.ctl[1]) if flags[F_HAS_SEED] else None
        options = inbox.take(i) if flags[F_HAS_OPTIONS] else None
        flags[:] = 0
        obs, info = env.reset(seed=seed, options=options)
        slot.write_obs(obs, slot.obs)
        slot.write_reset_info(info)
        return
    if cmd != STEP:
        raise RuntimeError(f"unknown worker command {cmd}")
    autoreset = bool(flags[F_AUTORESET])
    flags[:] = 0
    # the shared action itself, not a copy: the manager writes the next one only after this
    # step's result is published (tabletop and gymnasium envs copy or clip what they keep)
    obs, r, term, trunc, info = env.step(slot.action)
    slot.reward[...] = r
    flags[F_TERM], flags[F_TRUNC], flags[F_SUCCESS] = bool(term), bool(trunc), bool(info.get("success", False))
    if term or trunc:
        slot.write_obs(obs, slot.final)
        if autoreset:
            obs, rinfo = env.reset()
            slot.write_reset_info(rinfo)
    slot.write_obs(obs, slot.obs)
