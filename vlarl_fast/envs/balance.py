"""Load balancing for env workers: spreading workers over render devices, and moving envs between
workers by their measured costs.

Setting ``MUJOCO_EGL_DEVICE_ID`` from a process's rank (as VLA-RL's code does) crashes when a worker
sees fewer devices than its rank. Here the assignment is a pure function of measured per-env costs
(greedy, longest first), so it is tested with simulated costs and works for any number of devices.
Which devices exist and the variables that select them are render_devices' part.
Workers start spread evenly over the devices; the manager then moves envs between workers at
episode boundaries by their measured step+render costs (plan_rebalance), which evens out the
load of the workers and with it of the devices they render on.
"""
from __future__ import annotations

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
