"""Load balancing for env workers: spreading workers over render devices, and moving envs between
workers by their measured costs.

The reference code sets ``MUJOCO_EGL_DEVICE_ID`` from the process rank and crashes when a worker
sees fewer devices than its rank. Here the assignment is a pure function of measured per-env costs
(greedy, longest first), so it is tested with simulated costs and works for any number of devices.
Which devices exist and the variables that select them are render_devices' part (re-exported here).
Workers start spread evenly over the devices; the manager then moves envs between workers at
episode boundaries by their measured step+render costs (plan_rebalance), which evens out the
load of the workers and with it of the devices they render on.
"""
from __future__ import annotations

from typing import Sequence

from .render_devices import narrow_by_cuda_visible  # noqa: F401  (re-exported)


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
    """NVML indices of the GPUs this process may use (narrowed by CUDA_VISIBLE_DEVICES, in its order);
    [] without NVML or without a GPU."""
    from .render_devices import machine
    return [g.index for g in machine()["gpus"]]


def render_env(physical_gpu: int | None) -> dict:
    """Render variables for a worker that renders on the GPU with NVML index `physical_gpu` (None: {},
    the worker picks its backend itself): its EGL device as matched by PCI bus id / UUID / CUDA ordinal, and
    CUDA_VISIBLE_DEVICES naming the same GPU by UUID. RenderDeviceError when it has no EGL device."""
    if physical_gpu is None:
        return {}
    from .render_devices import CPU_FIX, NO_EGL_FIX, RenderDeviceError, gpu_vars, machine, match_egl, query_gpus
    m = machine()
    gpu = next((g for g in m["gpus"] if g.index == physical_gpu), None)  # visible: its CUDA ordinal is known
    if gpu is None and m["nvml_error"] is None:
        gpu = next((g for g in query_gpus() if g.index == physical_gpu), None)
    if gpu is None:
        raise RenderDeviceError(f"there is no NVIDIA GPU {physical_gpu} (NVML index) here")
    dev = match_egl([gpu], m["egl"]).get(gpu.index)
    if dev is None:
        raise RenderDeviceError(f"GPU {physical_gpu} ({gpu.uuid}) has no EGL device: {NO_EGL_FIX}; or render on "
                                f"the CPU with {CPU_FIX}")
    return gpu_vars(gpu, dev)


def worker_render_envs(num_envs: int, gpus=None, costs: Sequence[float] | None = None) -> list[dict]:
    """Per-worker render variables for `num_envs` workers spread by `costs` (default: equal) over `gpus`:
    None = 'auto' (the visible GPUs that have an EGL device), [] = 'cpu', or any render-device choice of
    render_devices.parse_render_device ('cuda', 'cuda:0,cuda:1', CUDA ordinals)."""
    from .render_devices import worker_render_vars
    return worker_render_vars("auto" if gpus is None else gpus, num_envs, costs)
