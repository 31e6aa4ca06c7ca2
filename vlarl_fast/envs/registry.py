"""Task lookup and env construction: ``list_tasks(suite)``, ``make_env(task_id, ...)``."""
from __future__ import annotations

import difflib

from .tabletop import tasks as tabletop_tasks
from .tabletop.tasks import TASKS, TaskSpec

SUITES = {"tabletop": [t for t in TASKS]}
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


class UnknownTaskError(ValueError):
    pass


def list_tasks(suite: str = "tabletop") -> list[str]:
    if suite in SUITES:
        return list(SUITES[suite])
    if suite in LIBERO_SUITES:
        from . import libero
        return libero.list_tasks(suite)
    raise ValueError(f"unknown suite {suite!r}; available suites: {', '.join([*SUITES, *LIBERO_SUITES])}")


def _libero_task(task_id: str):
    """The LIBERO task ``task_id`` names, or None. LIBERO ids (``libero_spatial/0``) need the extra; a
    bare name is looked up in LIBERO only where it is installed."""
    from . import libero
    if task_id.partition("/")[0] in LIBERO_SUITES:
        return libero.get_task(task_id)
    try:
        return libero.find_task(task_id)
    except libero.LiberoNotInstalledError:
        return None


def get_task(task_id: str):
    """A TaskSpec (tabletop) or a LiberoTask; both have task_id, instruction, max_episode_steps,
    num_init_states."""
    if task_id in TASKS:
        return TASKS[task_id]
    task = _libero_task(task_id)
    if task is not None:
        return task
    close = difflib.get_close_matches(task_id, list(TASKS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownTaskError(f"unknown task {task_id!r}.{hint} List the tasks with "
                           "`python -c \"import vlarl_fast.envs as e; print(e.list_tasks('tabletop'))\"` "
                           f"(LIBERO suites: {', '.join(LIBERO_SUITES)}).")


def make_env(task_id: str, *, image_size: int | None = None, seed: int | None = None, wrist: bool = False,
             reward: str | None = None, **options):
    """A gymnasium env for one task. ``image_size`` and ``reward`` default per suite (tabletop: 64,
    'dense'; LIBERO: 224, 'sparse'). Tabletop options: shaping_coef, max_delta, max_rot,
    max_episode_steps, split ('fixed', 'open' or 'heldout'); LIBERO's: see ``vlarl_fast.envs.libero.make_env``."""
    task = get_task(task_id)
    if not isinstance(task, TaskSpec):
        from .libero import LiberoEnv
        return LiberoEnv(task, image_size=224 if image_size is None else image_size, seed=seed, wrist=wrist,
                         reward=reward or "sparse", **options)
    from .tabletop.env import TabletopEnv
    return TabletopEnv(task, image_size=64 if image_size is None else image_size, seed=seed, wrist=wrist,
                       reward=reward or "dense", **options)


# the splits an env that a policy learns from (demonstrations, RL rollouts, the curriculum) may use;
# "heldout" is absent so held-out layouts stay unseen until evaluation
TRAINING_SPLITS = ("fixed", "open")


def make_training_env(task_id: str, **kwargs):
    """``make_env`` for the envs a policy learns from: an evaluation-only split is refused."""
    split = kwargs.get("split", "fixed")
    if split not in TRAINING_SPLITS:
        raise ValueError(f"split {split!r} is reserved for evaluation; envs that demonstrations or RL learn from "
                         f"use {' or '.join(map(repr, TRAINING_SPLITS))}")
    return make_env(task_id, **kwargs)


def split_size(task_id: str, split: str) -> int:
    """How many layouts ``split`` offers for a task: its fixed initial states, or (tabletop only) the open
    stream's index range or its held-out layouts."""
    tabletop_tasks.check_split(split)
    task = get_task(task_id)
    if isinstance(task, TaskSpec):
        return tabletop_tasks.split_size(task, split)
    if split != "fixed":
        raise ValueError(f"{task_id} has no {split!r} split: open and held-out layouts exist for the tabletop suite "
                         "only; train and evaluate LIBERO tasks on their fixed initial states (split 'fixed')")
    return task.num_init_states


def check_ready(task_ids: list[str]) -> None:
    """Fail in the calling process, before any env worker starts, when a task's benchmark cannot build its envs:
    LIBERO without its assets would otherwise fail inside every worker, as a worker's traceback."""
    if any(not isinstance(get_task(t), TaskSpec) for t in task_ids):
        from .libero.bootstrap import find_assets
        find_assets()
