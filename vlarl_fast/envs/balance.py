"""Render devices for env workers: which GPUs exist, which worker renders on which, and the
environment variables that make MuJoCo's EGL renderer use it.

The reference code sets ``MUJOCO_EGL_DEVICE_ID`` from the process rank and crashes when a worker
sees fewer devices than its rank. Here every id comes from the devices actually present, and the
assignment is a pure function of measured per-env costs (greedy, longest first), so it is tested
with simulated costs and works for any number of GPUs, including none (CPU rendering, no ids set).
Workers start spread evenly over the devices; the manager then moves envs between workers at
episode boundaries by their measured step+render costs (plan_rebalance), which evens out the
load of the workers and with it of the devices they render on.
"""
from __future__ import annotations

import os
from typing import Sequence


def assign_devices(costs: Sequence[float], num_devices: int) -> list[int]:
    """Device index (0..num_devices-1) for each env, balancing total cost per device.

    Greedy longest-processing-time-first: the costliest env goes to the least loaded device
    (ties: lowest index), which is within 4/3 of the optimal makespan. Costs are seconds per
    step+render as measured; equal costs give a round robin."""
    if num_devices < 1:
        raise ValueError(f"need at least one render device; got {num_devices}")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be non-negative")
    load = [0.0] * num_devices
    out = [0] * len(costs)
    # stable sort: equal costs keep env order, so the result is deterministic
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        d = min(range(num_devices), key=lambda d: (load[d], d))
        out[i] = d
        load[d] += costs[i]
    return out


def device_loads(costs: Sequence[float], devices: Sequence[int], num_devices: int) -> list[float]:
    load = [0.0] * num_devices
    for c, d in zip(costs, devices):
        load[d] += c
    return load


def plan_rebalance(costs: Sequence[float], owner: Sequence[int], num_workers: int,
                   min_gain: float = 0.1) -> list[int] | None:
    """Worker per env for a better balance, reached from `owner` with few moves; None when the most
    loaded worker cannot be lightened by over `min_gain` x the mean load (moving costs an env
    rebuild, and measured costs are noisy).

    Local search from the current assignment: take the move of one env, or the swap of two, that
    most lowers the larger load of the busiest worker and another, until none does. Each step
    lowers the sum of squared loads, so the search ends."""
    if len(owner) != len(costs) or any(not 0 <= w < num_workers for w in owner):
        raise ValueError(f"owner (length {len(owner)}) must give a worker in [0, {num_workers}) for each of "
                         f"the {len(costs)} costs")
    mean = sum(costs) / num_workers
    load = device_loads(costs, owner, num_workers)
    start = max(load)
    if start - mean <= min_gain * mean:  # no assignment beats the mean load
        return None
    owner = list(owner)
    for _ in range(4 * len(costs) + 4):
        a = max(range(num_workers), key=lambda w: (load[w], -w))
        mine = [i for i, w in enumerate(owner) if w == a]
        best, op = 1e-12 * max(mean, 1e-300), None
        for b in range(num_workers):
            if b == a:
                continue
            theirs = [j for j, w in enumerate(owner) if w == b] + [None]  # None: a move, no swap
            for i in mine:
                for j in theirs:
                    d = costs[i] - (0.0 if j is None else costs[j])
                    gain = load[a] - max(load[a] - d, load[b] + d)
                    if gain > best:
                        best, op = gain, (i, j, b, d)
        if op is None:
            break
        i, j, b, d = op
        owner[i] = b
        if j is not None:
            owner[j] = a
        load[a] -= d
        load[b] += d
    return owner if start - max(load) > min_gain * mean else None


def visible_gpus() -> list[int]:
    """Physical indices of the GPUs this process may use: NVML's devices, narrowed by
    CUDA_VISIBLE_DEVICES (indices or GPU-UUIDs). [] without NVML or without a GPU."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # ImportError, NVMLError_LibraryNotFound (no driver), NVMLError_DriverNotLoaded
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
        uuids = []
        for i in range(count):
            u = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            uuids.append(u.decode() if isinstance(u, bytes) else u)
    finally:
        pynvml.nvmlShutdown()
    return narrow_by_cuda_visible(uuids, os.environ.get("CUDA_VISIBLE_DEVICES"))


def narrow_by_cuda_visible(uuids: Sequence[str], cuda_visible: str | None) -> list[int]:
    """Physical indices named by CUDA_VISIBLE_DEVICES (None: all). Stops at the first invalid
    entry, as CUDA does."""
    if cuda_visible is None:
        return list(range(len(uuids)))
    out: list[int] = []
    for tok in (t.strip() for t in cuda_visible.split(",")):
        if tok.isdigit() and int(tok) < len(uuids):
            idx = int(tok)
        else:
            matches = [i for i, u in enumerate(uuids) if tok and u.startswith(tok if tok.startswith("GPU-") else "GPU-" + tok)]
            if len(matches) != 1:
                break
            idx = matches[0]
        if idx in out:
            break
        out.append(idx)
    return out


def render_env(physical_gpu: int | None) -> dict:
    """Environment variables for a worker that renders on `physical_gpu` (None: CPU rendering).

    EGL enumerates every GPU whatever CUDA_VISIBLE_DEVICES says, so MUJOCO_EGL_DEVICE_ID takes the
    physical index; CUDA_VISIBLE_DEVICES then narrows CUDA in the worker to the same GPU."""
    if physical_gpu is None:
        return {}
    return {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "MUJOCO_EGL_DEVICE_ID": str(physical_gpu),
            "CUDA_VISIBLE_DEVICES": str(physical_gpu)}


def worker_render_envs(num_envs: int, gpus: Sequence[int] | None = None,
                       costs: Sequence[float] | None = None) -> list[dict]:
    """Per-worker environment for `num_envs` workers spread over `gpus` (default: visible_gpus())
    by `costs` (default: equal). No GPU: every worker renders on the CPU (no device variables)."""
    gpus = visible_gpus() if gpus is None else list(gpus)
    if not gpus:
        return [{} for _ in range(num_envs)]
    costs = [1.0] * num_envs if costs is None else list(costs)
    if len(costs) != num_envs:
        raise ValueError(f"got {len(costs)} costs for {num_envs} envs")
    return [render_env(gpus[d]) for d in assign_devices(costs, len(gpus))]
