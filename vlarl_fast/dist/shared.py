"""What the ranks of a data-parallel run hold in common: the curriculum's statistics, iRe-VLA's episode buffer,
each iteration's figures and the evaluations. Each rank steps its own share of the envs; these bring the shares
together."""
from __future__ import annotations

import math

import numpy as np

from .comm import Comm


def rank_slots(num_envs: int, comm: Comm) -> slice:
    """The rank's envs among the run's ``num_envs``: a contiguous block, so slot i of the run keeps its task and
    seed whatever the number of ranks."""
    if num_envs % comm.world:
        raise ValueError(f"--env.num-envs {num_envs} must be a multiple of --dist.nproc {comm.world} (every rank "
                         "steps the same number of envs)")
    n = num_envs // comm.world
    return slice(comm.rank * n, (comm.rank + 1) * n)


class SharedCurriculum:
    """A rank's curriculum whose statistics are every rank's: outcomes count here at once and on the other ranks
    at the next ``sync`` (once an iteration); draws stay the rank's own (its RNG, its fresh layouts)."""

    def __init__(self, inner, comm: Comm):
        self.inner, self.comm = inner, comm
        self._log: list[tuple[str, int, bool]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update(self, task: str, init_state: int, success: bool) -> bool:
        accepted = self.inner.update(task, init_state, success)
        if accepted:
            self._log.append((task, int(init_state), bool(success)))
        return accepted

    def sync(self) -> None:
        logs, self._log = self.comm.all_gather(self._log), []
        for rank, log in enumerate(logs):
            if rank != self.comm.rank:
                for task, state, ok in log:
                    self.inner.record(task, state, ok)


def gather_successes(recorder, comm: Comm) -> None:
    """iRe-VLA's buffer is rank 0's: the other ranks hand it the successful episodes they kept since the last
    call, and empty theirs."""
    if comm.world == 1:
        return
    sent = comm.all_gather([] if comm.main else list(recorder.episodes))
    if comm.main:
        for episodes in sent[1:]:
            for e in episodes:
                recorder.add(e)
    else:
        recorder.episodes.clear()
        recorder.steps = 0


def _weighted(rows: list[dict], key: str, weight: str) -> float:
    pairs = [(r[key], r[weight]) for r in rows if r[weight] and not math.isnan(r[key])]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if not math.isnan(r[key])]
    return float(np.mean(vals)) if vals else math.nan


SUMMED = ("env_steps", "sps", "episodes", "groups_kept", "groups_dropped", "lost_steps")


def merge_iteration(rows: list[dict]) -> dict:
    """One iteration's figures over the ranks (``IterationStats`` as dicts, in rank order): counts and rates
    summed, success and return weighted by episodes, losses averaged; rank 0's first-minibatch checks."""
    if len(rows) == 1:
        return dict(rows[0])
    out = dict(rows[0])
    for k in SUMMED:
        out[k] = sum(r[k] for r in rows)
    out["success"] = _weighted(rows, "success", "episodes")
    out["episode_return"] = _weighted(rows, "episode_return", "episodes")
    for k in ("pg_loss", "v_loss", "entropy", "approx_kl", "clipfrac", "explained_variance", "kl_ref"):
        out[k] = _mean(rows, k)
    out["skipped_updates"] = max(r["skipped_updates"] for r in rows)   # skips are decided together
    for k in ("prm_seconds", "rollout_seconds", "update_seconds"):   # the slowest rank's time is the iteration's
        out[k] = max(r[k] for r in rows)
    return out


def eval_share(tasks: list[str], comm: Comm) -> list[str]:
    """The tasks this rank evaluates: every world-th, so each rank runs whole tasks."""
    return tasks[comm.rank::comm.world]


def merge_evals(results: list[dict | None], tasks: list[str]) -> dict:
    """The evaluation of every task from the ranks' shares (``evaluate`` results over disjoint tasks, None for a
    rank that had none), as one ``evaluate`` result."""
    parts = [r for r in results if r is not None]
    if len(parts) == 1:
        return parts[0]
    per_task, per_state, counts = {}, {}, {}
    for r in parts:
        per_task.update(r["per_task"])
        per_state.update(r["per_state"])
        counts.update(r["episodes_per_task"])
    n = sum(counts.values())
    return {"per_task": {t: per_task[t] for t in tasks}, "per_state": {t: per_state[t] for t in tasks},
            "success": sum(per_task[t] * counts[t] for t in tasks) / n, "episodes": n,
            "env_steps": sum(r["env_steps"] for r in parts), "split": parts[0]["split"],
            "episodes_per_task": {t: counts[t] for t in tasks}}
