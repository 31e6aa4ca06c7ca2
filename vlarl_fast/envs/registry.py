"""Task lookup and env construction: ``list_tasks(suite)``, ``make_env(task_id, ...)``."""
from __future__ import annotations

import difflib

from .tabletop.tasks import TASKS, TaskSpec

SUITES = {"tabletop": [t for t in TASKS]}
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


class UnknownTaskError(ValueError):
    pass


def list_tasks(suite: str = "tabletop") -> list[str]:
    if suite in SUITES:
        return list(SUITES[suite])
    if suite in LIBERO_SUITES:
        raise ValueError(f"suite {suite!r} (LIBERO) is not available yet in this version; "
                         f"available suites: {', '.join(SUITES)}")
    raise ValueError(f"unknown suite {suite!r}; available suites: {', '.join(SUITES)}")


def get_task(task_id: str) -> TaskSpec:
    if task_id in TASKS:
        return TASKS[task_id]
    close = difflib.get_close_matches(task_id, list(TASKS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownTaskError(f"unknown task {task_id!r}.{hint} List the tasks with "
                           "`python -c \"import vlarl_fast.envs as e; print(e.list_tasks('tabletop'))\"`.")


def make_env(task_id: str, *, image_size: int = 64, seed: int | None = None, wrist: bool = False,
             reward: str = "dense", **options):
    """A gymnasium env for one task. Options: shaping_coef, max_delta, max_rot, max_episode_steps."""
    from .tabletop.env import TabletopEnv
    return TabletopEnv(get_task(task_id), image_size=image_size, seed=seed, wrist=wrist, reward=reward, **options)
