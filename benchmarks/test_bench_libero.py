"""LIBERO env steps per second with rendering at 128 and 256 px: the worker-process VectorEnv against
gymnasium's AsyncVectorEnv(shared_memory=True) over the same factories, and against the limit = one
LIBERO env stepped in-process x cores (in a fresh process with LP_NUM_THREADS=1, as each worker runs).

Needs the libero extra and its assets (VLARL_LIBERO_ASSETS, or VLARL_LIBERO_ARCHIVE: an archive such as
the shared libero-assets.tar.gz, extracted once per session). Under ``--benchmark-disable`` only the
2-env 128 px case runs, for a few steps, as a smoke test.
"""
import importlib.util
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from _timing import record
from test_bench_vector import CORES, _rate, gym_async_rate

from vlarl_fast._ext import EXT_AVAILABLE
from vlarl_fast.envs import VectorEnv

TASKS = ["libero_spatial/0", "libero_object/0", "libero_goal/0", "libero_10/0"]

_SINGLE = """
import sys, time, numpy as np
from vlarl_fast.envs import make_env
size = int(sys.argv[2])
env = make_env(sys.argv[1], image_size=size, render_size=size, assets=sys.argv[4], seed=0)
n = int(sys.argv[3])
acts = np.random.default_rng(0).uniform(-1, 1, (n, 7)).astype(np.float32)
for a in acts[:3]:
    env.step(a)
t0 = time.perf_counter()
for a in acts:
    env.step(a)
print(n / (time.perf_counter() - t0))
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> str:
    if importlib.util.find_spec("libero") is None:
        pytest.skip("LIBERO is not installed (the libero extra)")
    if os.environ.get("VLARL_LIBERO_ASSETS"):
        return os.environ["VLARL_LIBERO_ASSETS"]
    archive = os.environ.get("VLARL_LIBERO_ARCHIVE")
    if not archive or not os.path.isfile(archive):
        pytest.skip("no LIBERO assets: set VLARL_LIBERO_ASSETS or VLARL_LIBERO_ARCHIVE")
    dest = tmp_path_factory.mktemp("libero-assets")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return str(dest)


def _fns(n, size, assets):
    from vlarl_fast.envs import make_env
    # episodes far longer than the timed steps: no reset (seconds for LIBERO) lands inside a measurement
    return [(lambda t=TASKS[i % len(TASKS)], i=i: make_env(t, image_size=size, render_size=size, assets=assets,
                                                           seed=i, max_episode_steps=10_000)) for i in range(n)]


def _single_env_rate(size: int, steps: int, assets: str) -> float:
    env = {**os.environ, "LP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _SINGLE, TASKS[0], str(size), str(steps), assets], env=env,
                         capture_output=True, text=True, check=True, timeout=600, cwd="/")
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not EXT_AVAILABLE, reason="the compiled extension is not built")
@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("num_envs", [2, 4])
def test_libero_steps_per_second(benchmark, assets, size, num_envs):
    if benchmark.disabled and (num_envs > 2 or size > 128):
        pytest.skip("timing grid: run with --benchmark-only")
    steps = 3 if benchmark.disabled else 20
    acts = np.random.default_rng(0).uniform(-1, 1, (num_envs, 7)).astype(np.float32) * 0.3
    with VectorEnv(_fns(num_envs, size, assets), backend="process") as v:
        v.reset(seed=0)
        obs = benchmark.pedantic(lambda: v.step(acts), rounds=3, iterations=1)[0]
        assert obs["image"].shape == (num_envs, size, size, 3)
        sync = _rate(lambda: v.step(acts), num_envs, steps)
    gym_rate = gym_async_rate(_fns(num_envs, size, assets), acts, steps)
    if benchmark.disabled:
        return
    limit = _single_env_rate(size, 2 * steps, assets) * min(CORES, num_envs)
    record(benchmark,
           f"LIBERO {num_envs} envs {size}px: manager {sync:.1f} steps/s, gymnasium AsyncVectorEnv {gym_rate:.1f}, "
           f"limit (1 env x {min(CORES, num_envs)} cores) {limit:.1f}; manager/gym x{sync / gym_rate:.2f}, "
           f"manager/limit {sync / limit:.0%}",
           sync=sync, gym=gym_rate, limit=limit, cores=CORES)
