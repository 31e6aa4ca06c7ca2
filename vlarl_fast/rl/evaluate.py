"""Evaluation over every (task, initial state) pair, vectorised.

Each env slot is bound to one task; the (init state, repeat) jobs of that task are dealt to its
slots, and slots step (as a batch) until every job has finished. Only busy slots are stepped.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ..envs import VectorEnv, make_env
from ..envs.registry import get_task
from ..policy import VLAPolicy


def states_per_task(tasks: list[str], init_states: int) -> dict[str, int]:
    """How many of each task's fixed initial states an evaluation covers (0: all of them)."""
    out = {}
    for t in tasks:
        n = get_task(t).num_init_states
        if init_states < 0 or init_states > n:
            raise ValueError(f"--eval.init-states {init_states} is outside [0, {n}] for {t} (it has {n} initial "
                             f"states; 0 evaluates all of them)")
        out[t] = init_states or n
    return out


def count_episodes(tasks: list[str], init_states: int, episodes_per_state: int) -> int:
    return sum(states_per_task(tasks, init_states).values()) * episodes_per_state


def evaluate(policy: VLAPolicy, tasks: list[str], *, init_states: int, episodes_per_state: int,
             num_envs: int, image_size: int, seed: int, greedy: bool, temperature: float,
             progress=None) -> dict:
    """Returns {"per_task": {task: success rate}, "success": mean over episodes, "episodes": n, "env_steps": n,
    "per_state": {task: [success rate per initial state]}}."""
    n_states = states_per_task(tasks, init_states)
    jobs: dict[str, list[int]] = {t: [s for s in range(n_states[t]) for _ in range(episodes_per_state)] for t in tasks}
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
    by_state: dict[str, list[list[bool]]] = {t: [[] for _ in range(n_states[t])] for t in tasks}
    current = {}
    env_steps = 0
    try:
        active = []
        for i in range(num_envs):
            if queues[i]:
                current[i] = queues[i].pop(0)
                venv.reset_env(i, options={"init_state": current[i]})
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
                    by_state[slot_task[i]][current[i]].append(bool(info["success"][j]))
                    if progress is not None:
                        progress.update(1)
                    if queues[i]:
                        current[i] = queues[i].pop(0)
                        venv.reset_env(i, options={"init_state": current[i]})
                        still.append(i)
                else:
                    still.append(i)
            active = still
    finally:
        venv.close()
    per_task = {t: float(np.mean(v)) for t, v in results.items()}
    n = sum(len(v) for v in results.values())
    succ = float(np.mean([x for v in results.values() for x in v]))
    per_state = {t: [float(np.mean(v)) for v in rows] for t, rows in by_state.items()}
    return {"per_task": per_task, "success": succ, "episodes": n, "env_steps": env_steps, "per_state": per_state}
