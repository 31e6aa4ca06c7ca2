"""Env steps per second on the tabletop suite with rendering: the worker-process VectorEnv (sync
step, and async send/recv over two halves) against gymnasium's AsyncVectorEnv(shared_memory=True)
over the same env factories, and against the limit = the same envs stepped in-process x cores.

The limit is measured honestly: the envs' bare ``step`` calls run one after another in a fresh process
with LP_NUM_THREADS=1 (llvmpipe otherwise renders one frame on every core), as each worker does; over the
same mix of tasks and the same actions as the managers, so a costlier task cannot flatter the ratio.
Every worker of both managers gets LP_NUM_THREADS=1 too. Each figure is the median of three rounds
of about a second, the four paths taking turns, so that load from other processes hits them alike;
ratios matter, absolute rates on a shared machine are noise. Under ``--benchmark-disable`` only the
2-env cases run, for a few steps, as a smoke test.
"""
import contextlib
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

# the envs of _fns stepped one after another in this process (bare env.step calls, auto-reset at
# episode ends), with the actions of _actions
_INPROCESS = """
import sys, time
sys.path.insert(0, sys.argv[4])
from test_bench_vector import _actions, _fns
n, size, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
envs = [fn() for fn in _fns(n, size)]
for i, env in enumerate(envs):
    env.reset(seed=i)
acts = _actions(n)

def step(k):
    for env, a in zip(envs, acts[k % len(acts)]):
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()

step(0)
k, t0 = 0, time.perf_counter()
while k < 3 or time.perf_counter() - t0 < seconds:
    step(k)
    k += 1
print(k * n / (time.perf_counter() - t0))
"""


def _inprocess_rate(num_envs: int, size: int, seconds: float) -> float:
    env = {**os.environ, "LP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _INPROCESS, str(num_envs), str(size), str(seconds),
                          os.path.dirname(os.path.abspath(__file__))], env=env, capture_output=True, text=True,
                         check=True, timeout=300, cwd="/")  # not the checkout: -c imports from the cwd
    return float(out.stdout.strip().splitlines()[-1])


def _actions(n: int, count: int = 16) -> np.ndarray:
    """A fixed cycle of random action batches, the same for every path."""
    return np.random.default_rng(0).uniform(-1, 1, (count, n, 7)).astype(np.float32)


def _timed_rate(step, n_envs: int, seconds: float) -> float:
    """Env steps per second of calling step(k) (k = 0, 1, ...) for about `seconds`."""
    step(0)
    k, t0 = 0, time.perf_counter()
    while k < 3 or time.perf_counter() - t0 < seconds:
        step(k)
        k += 1
    return k * n_envs / (time.perf_counter() - t0)


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
    rounds, seconds = (1, 0.05) if benchmark.disabled else (3, 1.0)
    acts = _actions(num_envs)
    half = num_envs // 2
    rates = {"sync": [], "async": [], "gym": [], "limit": []}
    with VectorEnv(_fns(num_envs, size), backend="process") as v, contextlib.closing(_gym_async(_fns(num_envs, size))) as g:
        v.reset(seed=0)
        g.reset(seed=0)
        obs = benchmark(lambda: v.step(acts[0]))[0]
        assert obs["image"].shape == (num_envs, size, size, 3)

        def async_step(k):
            # two groups in flight: while one steps, the caller handles the other (here: sends it again)
            ids = v.recv(batch_size=half)[4]["env_id"]
            v.send(acts[k % len(acts)][: len(ids)], ids)

        for _ in range(rounds):
            rates["sync"].append(_timed_rate(lambda k: v.step(acts[k % len(acts)]), num_envs, seconds))
            v.send(acts[0][:half], np.arange(half))
            v.send(acts[0][half:], np.arange(half, num_envs))
            # each call returns and resends one half
            rates["async"].append(_timed_rate(async_step, half, seconds) if half else rates["sync"][-1])
            while len(v.in_flight):
                v.recv()
            rates["gym"].append(_timed_rate(lambda k: g.step(acts[k % len(acts)]), num_envs, seconds))
            if not benchmark.disabled:
                rates["limit"].append(_inprocess_rate(num_envs, size, seconds) * CORES)
    if benchmark.disabled:
        return
    sync, asyn, gym_rate, limit = (float(np.median(rates[k])) for k in ("sync", "async", "gym", "limit"))
    record(benchmark,
           f"{num_envs} envs {size}px: manager sync {sync:.0f} steps/s, async {asyn:.0f}, "
           f"gymnasium AsyncVectorEnv {gym_rate:.0f}, limit (in-process x {CORES} cores) {limit:.0f}; "
           f"sync/gym x{sync / gym_rate:.2f}, sync/limit {sync / limit:.0%}, async/limit {asyn / limit:.0%}",
           sync=sync, asyn=asyn, gym=gym_rate, limit=limit, cores=CORES, rounds=rates)


class _CostlierScene:
    """An env whose every step costs `extra` more seconds of CPU (as a scene with more to render
    would): spun, not slept, so that it takes its worker's core."""

    def __init__(self, env, extra: float):
        self.env, self.extra = env, extra
        self.observation_space, self.action_space = env.observation_space, env.action_space

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, **kw):
        return self.env.reset(**kw)

    def step(self, action):
        end = time.perf_counter() + self.extra
        while time.perf_counter() < end:
            pass
        return self.env.step(action)

    def close(self):
        self.env.close()


def _uneven_fns(n, size, extra):
    # even envs costlier: at start (env i on worker i % workers) they crowd the even workers
    return [(lambda f=f, i=i: _CostlierScene(f(), extra if i % 2 == 0 else 0.0)) for i, f in enumerate(_fns(n, size))]


@pytest.mark.skipif(not EXT_AVAILABLE, reason="the compiled extension is not built")
def test_rebalanced_steps_per_second(benchmark):
    """Envs of unequal cost: moving envs between workers by measured cost against keeping the start
    assignment, both after the same warm-up (long enough for several episode boundaries per env)."""
    n, size = 8, 64
    extra = 0.0 if benchmark.disabled else 0.002
    rounds, seconds, warmup = (1, 0.05, 30) if benchmark.disabled else (3, 1.0, 120)
    acts = _actions(n)
    rates = {"rebalanced": [], "static": []}
    with VectorEnv(_uneven_fns(n, size, extra), backend="process", num_workers=2) as bal, \
            VectorEnv(_uneven_fns(n, size, extra), backend="process", num_workers=2, rebalance=False) as fixed:
        for v in (bal, fixed):
            v.reset(seed=0)
            for k in range(warmup):
                v.step(acts[k % len(acts)])
        benchmark(lambda: bal.step(acts[0]))
        for _ in range(rounds):
            for name, v in (("rebalanced", bal), ("static", fixed)):
                rates[name].append(_timed_rate(lambda k: v.step(acts[k % len(acts)]), n, seconds))
        moves, owners, costs = bal.moves, bal.env_workers.tolist(), bal.step_costs
    if benchmark.disabled:
        return
    assert moves >= 1
    r, s = float(np.median(rates["rebalanced"])), float(np.median(rates["static"]))
    loads = np.bincount(owners, weights=costs, minlength=2) * 1e3
    record(benchmark,
           f"{n} envs {size}px on 2 workers, even envs {extra * 1e3:.0f} ms costlier: rebalanced {r:.0f} steps/s "
           f"({moves} moves, worker loads {loads[0]:.1f}/{loads[1]:.1f} ms), static {s:.0f}; x{r / s:.2f}",
           rebalanced=r, static=s, moves=moves, rounds=rates)
