"""Where the process VectorEnv's time goes, per env step: CPU time of the workers and of the manager
(user/sys), context switches, and (--cprofile) the manager's hottest Python functions.

CPU time per env step is the figure to compare on a shared machine: wall-clock rates swing with
whatever else runs, CPU seconds spent by our own processes much less. The single-env line is the
same env stepped in-process (LP_NUM_THREADS=1, as in the workers): the workers' CPU above it is
what the manager's protocol costs them.

    python benchmarks/profile_vector.py --envs 8 --size 64 --steps 300 [--cprofile]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import time

import numpy as np

_SINGLE = """
import sys, time, numpy as np
from vlarl_fast.envs import make_env
env = make_env(sys.argv[1], image_size=int(sys.argv[2]), seed=0)
env.reset(seed=0)
acts = np.random.default_rng(0).uniform(-1, 1, (int(sys.argv[3]), 7)).astype(np.float32)
for a in acts[:3]:
    env.step(a)
c0 = time.process_time()
for a in acts:
    if any(env.step(a)[2:4]):
        env.reset()
print((time.process_time() - c0) / len(acts))
"""


def _proc_times(pid: int) -> np.ndarray:
    """user s, sys s, voluntary and involuntary context switches (all threads' CPU; main thread's switches)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    switches = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.endswith("ctxt_switches"):
                switches[key] = int(value)
    return np.array([int(fields[11]) / tick, int(fields[12]) / tick, switches["voluntary_ctxt_switches"],
                     switches["nonvoluntary_ctxt_switches"]], dtype=float)


def single_env_cpu(task: str, size: int, steps: int) -> float:
    env = {**os.environ, "LP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _SINGLE, task, str(size), str(steps)], env=env, capture_output=True,
                         text=True, check=True, timeout=600, cwd="/")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cprofile", action="store_true", help="also print the manager's top Python functions")
    args = p.parse_args(argv)
    from vlarl_fast.envs import VectorEnv, list_tasks, make_env
    tasks = list_tasks("tabletop")
    n = args.envs
    fns = [(lambda t=tasks[i % len(tasks)], i=i: make_env(t, image_size=args.size, seed=i)) for i in range(n)]
    acts = np.random.default_rng(0).uniform(-1, 1, (n, 7)).astype(np.float32)
    prof = cProfile.Profile() if args.cprofile else None
    with VectorEnv(fns, backend="process") as v:
        v.reset(seed=0)
        for _ in range(5):
            v.step(acts)
        pids = v.worker_pids
        w0, m0, t0 = sum(_proc_times(q) for q in pids), _proc_times(os.getpid()), time.perf_counter()
        if prof:
            prof.enable()
        for _ in range(args.steps):
            v.step(acts)
        if prof:
            prof.disable()
        wall = time.perf_counter() - t0
        total = args.steps * n
        w = (sum(_proc_times(q) for q in pids) - w0) / total
        m = (_proc_times(os.getpid()) - m0) / total
    single = np.mean([single_env_cpu(t, args.size, args.steps) for t in tasks[: min(n, len(tasks))]])
    print(f"{n} envs, {args.size} px, {args.steps} steps: {total / wall:.0f} env steps/s (wall clock: noisy)")
    print(f"per env step: workers user {w[0] * 1e3:.3f} ms + sys {w[1] * 1e3:.3f} ms, "
          f"{w[2]:.2f} voluntary / {w[3]:.2f} involuntary switches (main threads)")
    print(f"              manager user {m[0] * 1e3:.3f} ms + sys {m[1] * 1e3:.3f} ms, "
          f"{m[2]:.2f} voluntary / {m[3]:.2f} involuntary switches")
    print(f"single env in-process (LP_NUM_THREADS=1, mean over the tasks used): {single * 1e3:.3f} ms CPU per step; "
          f"workers + manager / single = x{(w[0] + w[1] + m[0] + m[1]) / single:.2f}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
