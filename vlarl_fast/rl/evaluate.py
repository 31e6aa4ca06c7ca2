"""Evaluation over every (task, initial state) pair, vectorised.

Each env slot is bound to one task; the (init state, repeat) jobs of that task are dealt to its
slots, and slots step (as a batch) until every job has finished. Only busy slots are stepped.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ..envs import VectorEnv, make_env
from ..policy import VLAPolicy


def evaluate(policy: VLAPolicy, tasks: list[str], *, init_states: int, episodes_per_state: int,
             num_envs: int, image_size: int, seed: int, greedy: bool, temperature: float,
             progress=None) -> dict:
    """Returns {"per_task": {task: success rate}, "success": mean over episodes, "episodes": n, "env_steps": n}."""
    jobs: dict[str, list[int]] = {t: [s for s in range(init_states) for _ in range(episodes_per_state)] for t in tasks}
    num_envs = max(len(tasks), min(num_envs, sum(len(j) for j in jobs.values())))
    slot_task = [tasks[i % len(tasks)] for i in range(num_envs)]
    queues: dict[int, list[int]] = defaultdict(list)
    for t in tasks:
        slots = [i for i, st in enumerate(slot_task) if st == t]
        for k, s in enumerate(jobs[t]):
            queues[slots[k % len(slots)]].append(s)
    fns = [(lambda t=t, i=i: make_env(t, image_size=image_size, seed=seed + 7919 * i)) for i, t in enumerate(slot_task)]
    venv = VectorEnv(fns, autoreset=False)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    results: dict[str, list[bool]] = {t: [] for t in tasks}
    env_steps = 0
    try:
        active = []
        for i in range(num_envs):
            if queues[i]:
                venv.reset_env(i, options={"init_state": queues[i].pop(0)})
                active.append(i)
        while active:
            ids = np.array(active)
            batch = venv.observations(ids)
            instructions = venv.instructions
            out = policy.act(batch["image"], batch["state"], [instructions[i] for i in ids],
                             temperature=temperature, greedy=greedy, generator=gen)
            _, _, term, trunc, info = venv._step_ids(out.actions, ids)
            env_steps += len(ids)
            still = []
            for j, i in enumerate(ids):
                if term[j] or trunc[j]:
                    results[slot_task[i]].append(bool(info["success"][j]))
                    if progress is not None:
                        progress.update(1)
                    if queues[i]:
                        venv.reset_env(i, options={"init_state": queues[i].pop(0)})
                        still.append(i)
                else:
                    still.append(i)
            active = still
    finally:
        venv.close()
    per_task = {t: float(np.mean(v)) for t, v in results.items()}
    n = sum(len(v) for v in results.values())
    succ = float(np.mean([x for v in results.values() for x in v]))
    return {"per_task": per_task, "success": succ, "episodes": n, "env_steps": env_steps}
