"""Worker processes for the vectorised env manager: one env per process, results in shared memory.

Each worker runs a short loop around one env factory. Per env there is one slot of the shared
batch (vlarl_fast._C.SharedBatch): observations, the action, reward, flags and reset info are
written in place there, and the slot's state word says whose turn it is:

    IDLE --manager writes action/command, sets CMD--> CMD --worker runs it, writes results--> DONE
    DONE --manager reads the results--> IDLE

Waiting happens in C++ on futexes with the GIL released; a worker publishes its result and waits
for its next command in one call. Rare, variable-size messages (the spaces at start-up, reset
options, an exception's traceback) go through a pipe per worker; the batch itself comes as a file
descriptor over that pipe (a Unix socket), so its name can be unlinked before any worker attaches
and no crash leaves an entry in /dev/shm.

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


def worker_main(index: int, fn_bytes: bytes, conn, env_vars: dict) -> None:
    """Entry point of a worker process (spawned: module level, importable)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    parent = os.getppid()
    # before the factory runs: llvmpipe and MuJoCo's EGL read these when the first context is made
    os.environ.update({k: str(v) for k, v in env_vars.items()})
    try:
        import cloudpickle
        env = cloudpickle.loads(fn_bytes)()
        conn.send(("spaces", env.observation_space, env.action_space))
    except BaseException:
        conn.send(("error", f"env factory {index} failed to build the env:\n{traceback.format_exc()}"))
        return
    if conn.recv()[0] != "batch":
        env.close()
        return
    batch = _receive_batch(conn)
    slot = _Slot(batch, index, list(env.observation_space.spaces))
    try:
        has_cmd = batch.wait(index, CMD, timeout=PARENT_CHECK_S)
        while True:
            if not has_cmd:
                if os.getppid() != parent:
                    return
                has_cmd = batch.wait(index, CMD, timeout=PARENT_CHECK_S)
                continue
            cmd = int(slot.ctl[0])
            if cmd == CLOSE:
                batch.set_state(index, DONE)
                return
            try:
                _run(env, slot, cmd, conn)
            except BaseException:
                # report and exit: the manager restarts this worker with a fresh env
                conn.send(("error", f"env {index} raised:\n{traceback.format_exc()}"))
                slot.flags[F_ERROR] = 1
                batch.set_state(index, DONE)
                return
            has_cmd = batch.publish_and_wait(index, DONE, CMD, timeout=PARENT_CHECK_S)
    finally:
        try:
            env.close()
        except Exception:
            pass


def _run(env, slot: _Slot, cmd: int, conn) -> None:
    flags = slot.flags
    if cmd == RESET:
        seed = int(slot.ctl[1]) if flags[F_HAS_SEED] else None
        options = conn.recv() if flags[F_HAS_OPTIONS] else None
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
