"""Evaluation over every (task, initial state) pair, vectorised.

``split`` names the layouts the initial states are: "fixed" (the task's fixed initial states, which
training also uses), "open" (the first layouts of the tabletop's open training stream) or "heldout"
(tabletop layouts no demonstration or RL episode sees).

Each env slot is bound to one task; the (init state, repeat) jobs of that task are dealt to its
slots, and slots step (as a batch) until every job has finished. Only busy slots are stepped.
The first ``record`` episodes of each task keep their frames (the policy's view) for videos, with the
proprio states and the actions taken (a reward model's training data).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ..config import vector_kwargs
from ..envs import VectorEnv, make_env
from ..envs.registry import split_size
from ..policy import VLAPolicy


def states_per_task(tasks: list[str], init_states: int, split: str = "fixed") -> dict[str, int]:
    """How many of each task's initial states (the first of the split's layouts) an evaluation covers
    (0: all of them)."""
    out = {}
    what = "initial states" if split == "fixed" else f"{split} layouts"
    for t in tasks:
        n = split_size(t, split)
        if split == "open" and init_states == 0:
            raise ValueError("the open stream of training layouts has no end: name how many of its first layouts "
                             "to evaluate with --init-states N (one episode each)")
        if init_states < 0 or init_states > n:
            raise ValueError(f"--eval.init-states {init_states} is outside [0, {n}] for {t} (it has {n} {what}; "
                             f"0 evaluates all of them)")
        out[t] = init_states or n
    return out


def episode_jobs(tasks: list[str], init_states: int, episodes_per_state: int,
                 episodes_per_task: int | None = None, split: str = "fixed") -> dict[str, list[int]]:
    """The initial state of every evaluation episode, per task: each state ``episodes_per_state`` times,
    or ``episodes_per_task`` episodes dealt over the states in order (state k for episode k mod n)."""
    n_states = states_per_task(tasks, init_states, split)
    if episodes_per_task is not None:
        if episodes_per_task < 1:
            raise ValueError(f"--episodes-per-task must be >= 1; got {episodes_per_task}")
        return {t: [k % n_states[t] for k in range(episodes_per_task)] for t in tasks}
    if episodes_per_state < 1:
        raise ValueError(f"--episodes-per-state must be >= 1; got {episodes_per_state}")
    return {t: [s for s in range(n_states[t]) for _ in range(episodes_per_state)] for t in tasks}


def count_episodes(tasks: list[str], init_states: int, episodes_per_state: int,
                   episodes_per_task: int | None = None, split: str = "fixed") -> int:
    return sum(len(j) for j in episode_jobs(tasks, init_states, episodes_per_state, episodes_per_task,
                                            split).values())


def evaluate(policy: VLAPolicy, tasks: list[str], *, init_states: int, episodes_per_state: int,
             num_envs: int, image_size: int | None, seed: int, greedy: bool, temperature: float,
             progress=None, episodes_per_task: int | None = None, env_options: dict | None = None,
             record: int = 0, backend: str = "inprocess", render_device: str = "auto", split: str = "fixed") -> dict:
    """Returns {"per_task": {task: success rate}, "success": mean over episodes, "episodes": n, "env_steps": n,
    "per_state": {task: [success rate per initial state]}, "split": split, "episodes_per_task": {task: n}}, plus "videos": {task:
    [{"init_state", "success", "frames" [T, H, W, 3], "states" [T, D], "actions" [T, 7]}]} for the first
    ``record`` episodes of each task."""
    n_states = states_per_task(tasks, init_states, split)
    jobs = episode_jobs(tasks, init_states, episodes_per_state, episodes_per_task, split)
    num_envs = max(len(tasks), min(num_envs, sum(len(j) for j in jobs.values())))
    slot_task = [tasks[i % len(tasks)] for i in range(num_envs)]
    queues: dict[int, list[int]] = defaultdict(list)
    for t in tasks:
        slots = [i for i, st in enumerate(slot_task) if st == t]
        for k, s in enumerate(jobs[t]):
            queues[slots[k % len(slots)]].append(s)
    opts = dict(env_options or {})
    if split != "fixed":
        # the default is left implicit: LIBERO's env takes no split option
        opts["split"] = split
    fns = [(lambda t=t, i=i: make_env(t, image_size=image_size, seed=seed + 7919 * i, **opts))
           for i, t in enumerate(slot_task)]
    venv = VectorEnv(fns, autoreset=False, **vector_kwargs(backend, render_device))
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    results: dict[str, list[bool]] = {t: [] for t in tasks}
    by_state: dict[str, list[list[bool]]] = {t: [[] for _ in range(n_states[t])] for t in tasks}
    current = {}
    env_steps = 0
    videos: dict[str, list[dict]] = {t: [] for t in tasks}
    started = {t: 0 for t in tasks}
    frames: dict[int, dict[str, list[np.ndarray]] | None] = {}

    def start(i: int) -> None:
        current[i] = queues[i].pop(0)
        venv.reset_env(i, options={"init_state": current[i]})
        t = slot_task[i]
        frames[i] = {"frames": [], "states": [], "actions": []} if started[t] < record else None
        started[t] += 1

    try:
        active = []
        for i in range(num_envs):
            if queues[i]:
                start(i)
                active.append(i)
        while active:
            ids = np.array(active)
            batch = venv.observations(ids)
            instructions = venv.instructions
            out = policy.act(batch["image"], batch["state"], [instructions[i] for i in ids],
                             temperature=temperature, greedy=greedy, generator=gen)
            for j, i in enumerate(ids):
                if frames[i] is not None:
                    for key, row in (("frames", batch["image"][j]), ("states", batch["state"][j]),
                                     ("actions", out.actions[j])):
                        frames[i][key].append(np.array(row))
            _, _, term, trunc, info = venv.step_envs(out.actions, ids)
            env_steps += len(ids)
            still = []
            for j, i in enumerate(ids):
                if term[j] or trunc[j]:
                    ok = bool(info["success"][j])
                    results[slot_task[i]].append(ok)
                    by_state[slot_task[i]][current[i]].append(ok)
                    if frames[i] is not None:
                        videos[slot_task[i]].append({"init_state": current[i], "success": ok,
                                                     **{k: np.stack(v) for k, v in frames[i].items()}})
                    if progress is not None:
                        progress.update(1)
                    if queues[i]:
                        start(i)
                        still.append(i)
                else:
                    still.append(i)
            active = still
    finally:
        venv.close()
    per_task = {t: float(np.mean(v)) for t, v in results.items()}
    n = sum(len(v) for v in results.values())
    succ = float(np.mean([x for v in results.values() for x in v]))
    # a state no episode was dealt to (episodes_per_task below the number of states) has no rate
    per_state = {t: [float(np.mean(v)) if v else None for v in rows] for t, rows in by_state.items()}
    out = {"per_task": per_task, "success": succ, "episodes": n, "env_steps": env_steps, "per_state": per_state,
           "split": split, "episodes_per_task": {t: len(v) for t, v in results.items()}}
    if record:
        out["videos"] = videos
    return out
