"""Env steps per second on the tabletop suite with rendering: the worker-process VectorEnv (sync
step, and async send/recv over two halves) against gymnasium's AsyncVectorEnv(shared_memory=True)
over the same env factories, and against the limit = one env stepped in-process x cores.

The limit is measured honestly: the single env runs in a fresh process with LP_NUM_THREADS=1
(llvmpipe otherwise renders one frame on every core), as each worker does. Every worker of both
managers gets LP_NUM_THREADS=1 too. Ratios matter; absolute rates on a shared machine are noise.
Under ``--benchmark-disable`` only the 2-env cases run, for a few steps, as a smoke test.
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from _timing import record

from vlarl_fast._ext import EXT_AVAILABLE
from vlarl_fast.envs import VectorEnv, list_tasks, make_env

TASKS = list_tasks("tabletop")
CORES = len(os.sched_getaffinity(0))

_SINGLE = """
import sys, time, numpy as np
from vlarl_fast.envs import make_env
env = make_env(sys.argv[1], image_size=int(sys.argv[2]), seed=0)
env.reset(seed=0)
rng = np.random.default_rng(0)
n = int(sys.argv[3])
acts = rng.uniform(-1, 1, (n, 7)).astype(np.float32)
for a in acts[:3]:
    env.step(a)
t0 = time.perf_counter()
for a in acts:
    _, _, term, trunc, _ = env.step(a)
    if term or trunc:
        env.reset()
print(n / (time.perf_counter() - t0))
"""


def _single_env_rate(size: int, steps: int) -> float:
    env = {**os.environ, "LP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _SINGLE, TASKS[0], str(size), str(steps)], env=env,
                         capture_output=True, text=True, check=True, timeout=300, cwd="/")  # not the checkout: -c imports from the cwd
    return float(out.stdout.strip().splitlines()[-1])


def _fns(n, size):
    return [(lambda t=TASKS[i % len(TASKS)], i=i: make_env(t, image_size=size, seed=i)) for i in range(n)]


def _rate(step, n_envs, steps):
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * n_envs / (time.perf_counter() - t0)


def _gym_async(fns):
    import gymnasium as gym
    old = os.environ.get("LP_NUM_THREADS")
    os.environ["LP_NUM_THREADS"] = "1"  # inherited by its spawned workers
    try:
        return gym.vector.AsyncVectorEnv(fns, shared_memory=True, context="spawn")
    finally:
        if old is None:
            del os.environ["LP_NUM_THREADS"]
        else:
            os.environ["LP_NUM_THREADS"] = old


def gym_async_rate(fns, acts, steps: int) -> float:
    """Steps per second of gymnasium's AsyncVectorEnv over ``fns`` (the baseline every manager is held to)."""
    g = _gym_async(fns)
    try:
        g.reset(seed=0)
        return _rate(lambda: g.step(acts), len(fns), steps)
    finally:
        g.close()


@pytest.mark.skipif(not EXT_AVAILABLE, reason="the compiled extension is not built")
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("num_envs", [2, 4, 8, 16])
def test_env_steps_per_second(benchmark, size, num_envs):
    if benchmark.disabled and num_envs > 2:
        pytest.skip("timing grid: run with --benchmark-only")
    steps = 3 if benchmark.disabled else 30
    rng = np.random.default_rng(0)
    acts = rng.uniform(-1, 1, (num_envs, 7)).astype(np.float32)
    half = num_envs // 2
    with VectorEnv(_fns(num_envs, size), backend="process") as v:
        v.reset(seed=0)
        obs = benchmark(lambda: v.step(acts))[0]
        assert obs["image"].shape == (num_envs, size, size, 3)
        sync = _rate(lambda: v.step(acts), num_envs, steps)

        # two groups in flight: while one steps, the caller handles the other (here: sends it again)
        v.send(acts[:half], np.arange(half))
        v.send(acts[half:], np.arange(half, num_envs))

        def async_round():
            for _ in range(2):
                ids = v.recv(batch_size=half)[4]["env_id"]
                v.send(acts[: len(ids)], ids)

        asyn = _rate(async_round, num_envs, steps)
        while len(v.in_flight):
            v.recv()
    gym_rate = gym_async_rate(_fns(num_envs, size), acts, steps)
    if benchmark.disabled:
        return
    limit = _single_env_rate(size, 4 * steps) * CORES
    record(benchmark,
           f"{num_envs} envs {size}px: manager sync {sync:.0f} steps/s, async {asyn:.0f}, "
           f"gymnasium AsyncVectorEnv {gym_rate:.0f}, limit (1 env x {CORES} cores) {limit:.0f}; "
           f"sync/gym x{sync / gym_rate:.2f}, sync/limit {sync / limit:.0%}, async/limit {asyn / limit:.0%}",
           sync=sync, asyn=asyn, gym=gym_rate, limit=limit, cores=CORES)
