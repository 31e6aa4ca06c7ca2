"""Periodic RL checkpoints that a run resumes from exactly (``--checkpoint-every``, ``--resume``).

A checkpoint is taken between two iterations and holds everything the rest of the run depends on: the weights
(model, critic), both optimisers (PPO's and the iRe-VLA stage's, with their float32 masters), every RNG (python,
numpy, torch, the rollout's generator, the curriculum's, the stage's row sampler), the curriculum's statistics,
the group schedule, the iRe-VLA episode buffer (episodes in progress included), the counters, the history and
the evaluations already made. The envs are not pickled: each env's episode in progress is its initial state and
the actions taken since, and a resumed run rebuilds it by resetting to that state and replaying the actions
(the simulator is deterministic), so worker processes, renderers and GPUs need no saving.

Layout: ``RUN_DIR/checkpoints/rl-NNNNN/state.pt`` (NNNNN the iteration), written atomically; the newest
``--checkpoint-keep`` are kept. A data-parallel run's ranks each write their own part (rank r > 0:
``state.rank<r>.pt``: its envs, RNGs, curriculum draws and episode buffer) into the same folder, which appears
once every part is written; such a checkpoint resumes with the same number of ranks.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..dist.comm import SINGLE, Comm
from ..policy.atomic_dir import atomic_directory
from ..validate import ConfigError

PATTERN = re.compile(r"^rl-(\d{5,})$")
STATE = "state.pt"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's RL checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := PATTERN.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(trainer, *, stage=None, recorder=None, curriculum=None, schedule=None, extra: dict) -> dict:
    """The run's state between two iterations (``extra``: history, evaluations, timings: what train keeps)."""
    pol = trainer.policy
    return {
        "iteration": trainer.iteration, "global_step": trainer.global_step,
        # saved at once (``save``), so the tensors need no copy of their own: a 7B model's weights are not doubled
        "model": {k: v.detach().cpu() for k, v in pol.model.state_dict().items()},
        "critic": None if pol.critic is None else {k: v.detach().cpu() for k, v in pol.critic.state_dict().items()},
        "norm_stats": pol.norm_stats,
        "optimizer": trainer.optimizer.state_dict(), "masters": trainer.masters.state_dict(),
        "generator": trainer.generator.get_state(), "rng": rng_states(),
        "envs": trainer.env_replay(),
        "shaping_phi": None if trainer.shaping is None else np.array(trainer.shaping.phi),
        "stage": None if stage is None else stage.state_dict(),
        "recorder": None if recorder is None else recorder.state_dict(),
        "curriculum": None if curriculum is None else {"state": curriculum.state_dict(),
                                                        "rng": curriculum.rng.bit_generator.state},
        "schedule": None if schedule is None else schedule.state_dict(),
        "extra": extra,
    }


def state_file(rank: int) -> str:
    return STATE if rank == 0 else f"state.rank{rank}.pt"


def save(run_dir: str | Path, state: dict, keep: int, comm: Comm = SINGLE) -> Path:
    path = Path(run_dir) / "checkpoints" / f"rl-{state['iteration']:05d}"
    state = {**state, "world_size": comm.world}
    # rank 0 makes the folder; every rank writes its part there; it is published once all parts are in
    if comm.main:
        with atomic_directory(path) as tmp:
            torch.save(state, Path(comm.broadcast(str(tmp))) / state_file(comm.rank))
            comm.barrier()
    else:
        torch.save(state, Path(comm.broadcast(None)) / state_file(comm.rank))
        comm.barrier()
    comm.barrier()
    if comm.main:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load(path: str | Path, comm: Comm = SINGLE) -> dict:
    file = Path(path) / state_file(comm.rank)
    if not file.is_file():
        raise ConfigError(f"{path} holds no part for rank {comm.rank}: it was saved by fewer ranks; resume with the "
                         "--dist.nproc the run was started with")
    # our own file, holding numpy and python objects besides tensors
    state = torch.load(file, map_location="cpu", weights_only=False)
    saved = state.get("world_size", 1)
    if saved != comm.world:
        raise ConfigError(f"{path} was saved by {saved} ranks; resume it with --dist.nproc {saved} (this run has "
                         f"{comm.world})")
    return state


def restore(state: dict, trainer, *, stage=None, recorder=None, curriculum=None, schedule=None) -> None:
    """Put a captured state back into freshly built objects (the trainer made as the original run made it), the
    envs' episodes in progress included; the global RNGs last, so nothing after consumes them."""
    pol = trainer.policy
    pol.model.load_state_dict(state["model"])
    if state["critic"] is not None:
        pol.critic.load_state_dict(state["critic"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.masters.load_state_dict(state["masters"])
    trainer.generator.set_state(state["generator"])
    trainer.iteration, trainer.global_step = state["iteration"], state["global_step"]
    if curriculum is not None:
        curriculum.load_state_dict(state["curriculum"]["state"])
        curriculum.rng.bit_generator.state = state["curriculum"]["rng"]
    if schedule is not None:
        schedule.load_state_dict(state["schedule"])
    if stage is not None:
        stage.load_state_dict(state["stage"])
    if recorder is not None:
        recorder.load_state_dict(state["recorder"])
    trainer.replay_envs(state["envs"])
    if trainer.shaping is not None:
        trainer.shaping.phi = np.array(state["shaping_phi"])
    set_rng_states(state["rng"])
