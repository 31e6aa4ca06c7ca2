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
once every part is written; such a checkpoint resumes with the same number of ranks. A sharded policy
(``--dist.shard full``) keeps its weights and both optimisers' moments out of those files: every rank writes its
shards into ``sharded/`` through ``torch.distributed.checkpoint``.
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
SHARDED = "sharded"   # the folder of a sharded policy's weights and optimiser moments, and its marker in state.pt


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
    sharded = trainer.root is not None   # its tensors go to sharded/ (``save``)
    stage_state = None if stage is None else stage.state_dict()
    if sharded and stage_state is not None:
        stage_state = {**stage_state, "optimizer": SHARDED if stage.optimizer is not None else None, "masters": None}
    return {
        "iteration": trainer.iteration, "global_step": trainer.global_step,
        # saved at once (``save``), so the tensors need no copy of their own: a 7B model's weights are not doubled
        "model": SHARDED if sharded else {k: v.detach().cpu() for k, v in pol.model.state_dict().items()},
        "critic": None if pol.critic is None or sharded else
        {k: v.detach().cpu() for k, v in pol.critic.state_dict().items()},
        "norm_stats": pol.norm_stats,
        "optimizer": SHARDED if sharded else trainer.optimizer.state_dict(), "masters": trainer.masters.state_dict(),
        "generator": trainer.generator.get_state(), "rng": rng_states(),
        "envs": trainer.env_replay(),
        "shaping_phi": None if trainer.shaping is None else np.array(trainer.shaping.phi),
        "stage": stage_state,
        "recorder": None if recorder is None else recorder.state_dict(),
        "curriculum": None if curriculum is None else {"state": curriculum.state_dict(),
                                                        "rng": curriculum.rng.bit_generator.state},
        "schedule": None if schedule is None else schedule.state_dict(),
        "extra": extra,
    }


def state_file(rank: int) -> str:
    return STATE if rank == 0 else f"state.rank{rank}.pt"


def sharded_parts(trainer, stage=None) -> tuple | None:
    """(root unit, optimisers by name) of a sharded policy, for ``save`` and ``restore``; None otherwise."""
    if trainer.root is None:
        return None
    optimizers = {"optimizer": trainer.optimizer}
    if stage is not None and stage.optimizer is not None:
        optimizers["stage_optimizer"] = stage.optimizer
    return trainer.root, optimizers


def save(run_dir: str | Path, state: dict, keep: int, comm: Comm = SINGLE, sharded: tuple | None = None) -> Path:
    """``sharded``: ``sharded_parts(...)`` of a sharded policy, whose shards every rank writes."""
    path = Path(run_dir) / "checkpoints" / f"rl-{state['iteration']:05d}"
    state = {**state, "world_size": comm.world}

    def write(folder: Path) -> None:
        if sharded is not None:
            from ..dist.fsdp import save_sharded
            save_sharded(folder / SHARDED, *sharded)
        torch.save(state, folder / state_file(comm.rank))
        comm.barrier()

    # rank 0 makes the folder; every rank writes its part there; it is published once all parts are in
    if comm.main:
        with atomic_directory(path) as tmp:
            write(Path(comm.broadcast(str(tmp))))
    else:
        write(Path(comm.broadcast(None)))
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
    state["path"] = str(path)   # where a sharded policy's shards are
    return state


def restore(state: dict, trainer, *, stage=None, recorder=None, curriculum=None, schedule=None) -> None:
    """Put a captured state back into freshly built objects (the trainer made as the original run made it), the
    envs' episodes in progress included; the global RNGs last, so nothing after consumes them."""
    pol = trainer.policy
    if (state["model"] == SHARDED) != (trainer.root is not None):
        raise ConfigError(f"{state['path']} was saved {'with' if state['model'] == SHARDED else 'without'} "
                          "--dist.shard full; resume it the same way")
    if trainer.root is not None:
        if stage is not None:
            stage.load_state_dict(state["stage"])   # makes the stage's optimiser, whose moments come next
        from ..dist.fsdp import load_sharded
        load_sharded(Path(state["path"]) / SHARDED, *sharded_parts(trainer, stage))
    else:
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
    if stage is not None and trainer.root is None:
        stage.load_state_dict(state["stage"])
    if recorder is not None:
        recorder.load_state_dict(state["recorder"])
    trainer.replay_envs(state["envs"])
    if trainer.shaping is not None:
        trainer.shaping.phi = np.array(state["shaping_phi"])
    set_rng_states(state["rng"])
