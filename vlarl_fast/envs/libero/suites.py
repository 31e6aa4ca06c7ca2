"""LIBERO's suites and tasks as the benchmark defines them: BDDL files, fixed initial states, instructions.

Task ids are ``<suite>/<index>`` in the benchmark's own order (LIBERO's ``task_order_index=0``, the one
every published evaluation uses), e.g. ``libero_spatial/0``; ``<suite>/<task name>`` and a bare task name
(the BDDL file's stem) resolve to the same task. Ids stay short because the vectorised manager carries
them in a fixed 64-byte field, and libero_90's task names are longer than that.

Episode limits are the ones the VLA papers evaluate with (OpenVLA's LIBERO script, VLA-RL): the longest
demonstration of each suite plus a margin.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

import numpy as np

from .bootstrap import import_libero, package_dir

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
MAX_EPISODE_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                     "libero_90": 400}


@dataclass(frozen=True)
class LiberoTask:
    task_id: str
    """``<suite>/<index>``: the id list_tasks returns and the manager carries."""
    suite: str
    index: int
    name: str
    """LIBERO's task name (the BDDL file's stem)."""
    instruction: str
    """The benchmark's language instruction (from the task name, as LIBERO's Benchmark and OpenVLA use it)."""
    max_episode_steps: int
    num_init_states: int

    @property
    def bddl_file(self) -> str:
        return str(package_dir() / "bddl_files" / self.suite / f"{self.name}.bddl")

    @property
    def init_states_file(self) -> str:
        return str(package_dir() / "init_files" / self.suite / f"{self.name}.pruned_init")


def _check_suite(suite: str) -> None:
    if suite not in SUITES:
        close = difflib.get_close_matches(suite, SUITES, n=2, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown LIBERO suite {suite!r}; the suites are {', '.join(SUITES)}.{hint}")


@functools.lru_cache(maxsize=None)
def _task_maps() -> dict:
    import_libero()  # the benchmark module imports libero.libero, which must not prompt
    from libero.libero.benchmark import task_maps
    return task_maps


def task_names(suite: str) -> list[str]:
    """LIBERO's task names of ``suite`` in the benchmark's order (index i is task ``<suite>/<i>``)."""
    _check_suite(suite)
    return list(_task_maps()[suite])


def list_tasks(suite: str) -> list[str]:
    return [f"{suite}/{i}" for i in range(len(task_names(suite)))]


@functools.lru_cache(maxsize=None)
def load_init_states(suite: str, name: str) -> np.ndarray:
    """The benchmark's fixed initial states of one task: float64 [N, D] flattened MuJoCo states
    (time, qpos, qvel), as LIBERO's ``Benchmark.get_task_init_states`` reads them."""
    import torch
    path = package_dir() / "init_files" / suite / f"{name}.pruned_init"
    # the file is a pickled numpy array (torch.save), shipped inside the installed package itself
    states = np.asarray(torch.load(path, weights_only=False), dtype=np.float64)
    if states.ndim != 2 or len(states) == 0:
        raise ValueError(f"{path} holds {states.shape}, not a list of initial states; reinstall LIBERO")
    states.setflags(write=False)
    return states


def _suite_of(name: str) -> list[str]:
    return [s for s in SUITES if name in _task_maps()[s]]


def find_task(task_id: str) -> LiberoTask | None:
    """The task an id names, or None when it names no LIBERO task (unknown suites and indices raise)."""
    suite, sep, rest = task_id.partition("/")
    if sep:
        if suite not in SUITES:
            return None
        names = task_names(suite)
        if rest.isdigit():
            i = int(rest)
            if i >= len(names):
                raise ValueError(f"{task_id!r}: {suite} has tasks 0..{len(names) - 1}")
            return _make(suite, i)
        if rest in names:
            return _make(suite, names.index(rest))
        close = difflib.get_close_matches(rest, names, n=2, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{task_id!r}: {suite} has no task {rest!r}.{hint} Use <suite>/<index>; "
                         f"`vlarl_fast.envs.list_tasks({suite!r})` lists them.")
    suites = _suite_of(task_id)
    if not suites:
        return None
    if len(suites) > 1:
        raise ValueError(f"task {task_id!r} is in several suites ({', '.join(suites)}), whose episode limits "
                         f"differ: name it as <suite>/{task_id}")
    return _make(suites[0], task_names(suites[0]).index(task_id))


def get_task(task_id: str) -> LiberoTask:
    task = find_task(task_id)
    if task is None:
        suite, sep, _ = task_id.partition("/")
        if sep:
            _check_suite(suite)
        raise ValueError(f"{task_id!r} names no LIBERO task; ids look like libero_spatial/0 (suites: "
                         f"{', '.join(SUITES)})")
    return task


@functools.lru_cache(maxsize=None)
def _make(suite: str, index: int) -> LiberoTask:
    name = task_names(suite)[index]
    return LiberoTask(task_id=f"{suite}/{index}", suite=suite, index=index, name=name,
                      instruction=_task_maps()[suite][name].language, max_episode_steps=MAX_EPISODE_STEPS[suite],
                      num_init_states=len(load_init_states(suite, name)))
