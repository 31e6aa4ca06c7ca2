"""PPO's rollout on the tabletop suite with the default tiny VLA and worker-process envs: the synchronous loop
(the policy decodes for every env, then every env steps; the baseline) against the pipelined one (two halves
of the envs alternate, so one half steps while the policy decodes for the other). Both in one run, on the same
envs and policy; ``pipelined_vs_sync`` is the ratio of env steps per second. Under ``--benchmark-disable`` it
runs at a toy size as a smoke test."""
import numpy as np
import pytest
from _timing import median_seconds, record

from vlarl_fast._ext import EXT_AVAILABLE
from vlarl_fast.config import PolicyConfig, PPOConfig
from vlarl_fast.envs import VectorEnv, make_env
from vlarl_fast.envs.tabletop.tasks import TASKS
from vlarl_fast.policy import make_policy
from vlarl_fast.rl.curriculum import OpenCurriculum
from vlarl_fast.rl.trainer import PPOTrainer


@pytest.mark.parametrize("resets", ["in_worker", "curriculum"])
def test_pipelined_vs_sync_rollout(benchmark, resets):
    """``resets``: 'in_worker', ended episodes restart inside their worker; 'curriculum', as `vlarl-fast train`
    runs (every episode start drawn by the curriculum, so the manager resets ended envs itself)."""
    small = benchmark.disabled
    num_envs, steps = (4, 3) if small else (48, 16)
    tasks = list(TASKS)
    backend = "process" if EXT_AVAILABLE else "inprocess"
    fns = [(lambda t=tasks[i % len(tasks)], i=i: make_env(t, image_size=64, seed=i, split="open"))
           for i in range(num_envs)]
    policy = make_policy("tiny", instructions=[TASKS[t].instruction for t in tasks], image_size=64, seed=0,
                         hidden_size=PolicyConfig().hidden_size, num_layers=PolicyConfig().num_layers)
    options = None
    if resets == "curriculum":
        curriculum = OpenCurriculum(tasks, fresh=1.0, seed=0)
        options = (lambda i: {"init_state": curriculum.sample(tasks[i % len(tasks)])})
    with VectorEnv(fns, backend=backend, reset_options=options) as envs:
        trainer = PPOTrainer(policy, envs, PPOConfig(num_steps=steps), seed=0)

        def rollout(kind):
            def run():
                trainer.cfg.rollout = kind
                trainer.collect()
            return run

        benchmark.pedantic(rollout("pipelined"), rounds=2 if small else 3, iterations=1)
        if small:
            return
        t_sync = median_seconds(rollout("sync"), 5)
        t_piped = median_seconds(rollout("pipelined"), 5)
    n = num_envs * steps
    ratio = t_sync / t_piped
    record(benchmark, f"PPO rollout, {num_envs} tabletop envs ({backend}, resets {resets}) x {steps} steps, tiny "
           f"VLA: sync {n / t_sync:.0f} env steps/s, pipelined {n / t_piped:.0f}: x{ratio:.2f}",
           sync_steps_per_s=n / t_sync, pipelined_steps_per_s=n / t_piped, pipelined_vs_sync=ratio,
           backend=backend, resets=resets)
    assert np.isfinite(ratio)

