"""Group bookkeeping of GRPO and RLOO: which initial state each env starts from, and the episode-level
advantages of a group.

K consecutive env slots form a group (one task). Each time a slot starts an episode it takes its group's next
draw, so the n-th episodes of the K slots start from the same (task, initial state) and run side by side. A group
is complete when its K episodes have ended; its advantages compare each episode's return with the others':

- GRPO (DeepSeekMath; SimpleVLA-RL): (R_i - mean(R)) / (std(R) + eps);
- RLOO (Ahmadian et al. 2024; RIPT-VLA): R_i - mean of the other K - 1 returns.

Dynamic sampling (DAPO; SimpleVLA-RL's 0.1-0.9 accuracy filter) drops groups whose episodes all succeeded or all
failed: their advantages are all zero under either estimator, so they cost update time and teach nothing.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ALGOS = ("ppo", "grpo", "rloo")
GROUP_ALGOS = ("grpo", "rloo")


class GroupSchedule:
    """``reset_options`` for the vector env: slot i belongs to group i // K and starts each episode from its
    group's next draw. ``draw(task)`` picks an initial state (the curriculum's ``sample``); the first slot of a
    group to start its n-th episode draws it, the others take the same one."""

    def __init__(self, slot_task: list[str], group_size: int, draw: Callable[[str], int]):
        if group_size < 2:
            raise ValueError(f"a group needs at least 2 episodes to compare; got --ppo.group-size {group_size}")
        if len(slot_task) % group_size:
            raise ValueError(f"--env.num-envs {len(slot_task)} is not a multiple of --ppo.group-size {group_size}: "
                             "every group runs its K episodes side by side")
        for g in range(0, len(slot_task), group_size):
            if len(set(slot_task[g:g + group_size])) != 1:
                raise ValueError("the slots of a group must share one task (group_slot_tasks lays them out)")
        self.slot_task, self.K, self.draw = slot_task, group_size, draw
        self.rounds = np.zeros(len(slot_task), dtype=np.int64)   # episodes each slot has started
        self._draws: dict[tuple[int, int], list] = {}           # (group, round) -> [state, slots still to take it]

    def __call__(self, i: int) -> dict:
        g, r = i // self.K, int(self.rounds[i])
        self.rounds[i] += 1
        entry = self._draws.get((g, r))
        if entry is None:
            entry = self._draws[(g, r)] = [int(self.draw(self.slot_task[i])), self.K]
        entry[1] -= 1
        if entry[1] == 0:
            del self._draws[(g, r)]
        return {"init_state": entry[0]}

    def state_dict(self) -> dict:
        return {"rounds": self.rounds.tolist(), "draws": [[g, r, s, left] for (g, r), (s, left) in self._draws.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = np.asarray(state["rounds"], dtype=np.int64)
        self._draws = {(g, r): [s, left] for g, r, s, left in state["draws"]}


def group_slot_tasks(tasks: list[str], num_envs: int, group_size: int) -> list[str]:
    """The task of each env slot: groups of K consecutive slots, the tasks dealt round-robin over the groups."""
    return [tasks[(i // group_size) % len(tasks)] for i in range(num_envs)]


def group_advantages(returns: np.ndarray, groups: np.ndarray, algo: str, eps: float = 1e-6) -> np.ndarray:
    """Episode-level advantages [E] of episodes with ``returns`` [E] in ``groups`` [E] (ids)."""
    if algo not in GROUP_ALGOS:
        raise ValueError(f"group advantages are for {' and '.join(GROUP_ALGOS)}; got {algo!r}")
    returns = np.asarray(returns, dtype=np.float64)
    adv = np.zeros_like(returns)
    for g in np.unique(groups):
        sel = groups == g
        r, k = returns[sel], int(sel.sum())
        if k < 2:
            continue   # nothing to compare with (the rest of its group was lost to env restarts)
        if algo == "grpo":
            adv[sel] = (r - r.mean()) / (r.std(ddof=1) + eps)
        else:
            adv[sel] = r - (r.sum() - r) / (k - 1)
    return adv.astype(np.float32)


def group_advantages_reference(returns, groups, algo: str, eps: float = 1e-6) -> list[float]:
    """The definitions written out episode by episode: what ``group_advantages`` must match."""
    out = []
    for i, (ri, gi) in enumerate(zip(returns, groups)):
        mates = [float(r) for r, g in zip(returns, groups) if g == gi]
        others = [float(r) for j, (r, g) in enumerate(zip(returns, groups)) if g == gi and j != i]
        if not others:
            out.append(0.0)
        elif algo == "grpo":
            mean = sum(mates) / len(mates)
            std = (sum((m - mean) ** 2 for m in mates) / (len(mates) - 1)) ** 0.5
            out.append((float(ri) - mean) / (std + eps))
        else:
            out.append(float(ri) - sum(others) / len(others))
    return out


def informative(successes: np.ndarray) -> bool:
    """Dynamic sampling's test of a complete group: some episodes succeeded and some failed."""
    s = np.asarray(successes, dtype=bool)
    return bool(s.any() and not s.all())
