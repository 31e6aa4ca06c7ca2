"""Starting the ranks of a data-parallel run (docs/distributed.md): N processes on this machine
(``--dist.nproc N``), the ranks torchrun started, or Ray Train workers on a Ray cluster (``--dist.ray``, ray_train.py).
Every rank then runs ``train`` with its ``Comm``."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import signal
import socket
import sys
from datetime import timedelta

import torch

from .comm import Comm


def torchrun_ranks() -> tuple[int, int, int, int] | None:
    """(rank, world, local rank, local world) when torchrun (or another launcher using its variables) started this
    process as one rank of several; None otherwise."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or "MASTER_ADDR" not in env or int(env["WORLD_SIZE"]) < 2:
        return None
    world = int(env["WORLD_SIZE"])
    return (int(env["RANK"]), world, int(env.get("LOCAL_RANK", env["RANK"])),
            int(env.get("LOCAL_WORLD_SIZE", world)))


def check_dist(cfg, world: int) -> None:
    """What N ranks need of the run's configuration, checked before any rank starts."""
    from ..config import resolve_env
    from ..rl.groups import GROUP_ALGOS
    from ..validate import ConfigError
    env = resolve_env(dataclasses.replace(cfg.env))
    if env.num_envs % world:
        raise ConfigError(f"--env.num-envs {env.num_envs} must be a multiple of --dist.nproc {world} (every rank "
                          "steps the same number of envs)")
    if cfg.ppo.algo in GROUP_ALGOS and (env.num_envs // world) % cfg.ppo.group_size:
        raise ConfigError(f"--ppo.algo {cfg.ppo.algo}: each rank's {env.num_envs // world} envs must be a multiple "
                          f"of --ppo.group-size {cfg.ppo.group_size} (a group runs on one rank)")
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
        if cfg.dist.ray is None and torchrun_ranks() is None and world > torch.cuda.device_count():
            raise ConfigError(f"--dist.nproc {world} with --device cuda needs a GPU per rank; this machine has "
                              f"{torch.cuda.device_count()}")
    if cfg.dist.backend == "nccl" and not cfg.device.startswith("cuda"):
        raise ConfigError("--dist.backend nccl moves CUDA tensors only: use --device cuda, or --dist.backend gloo")
    if cfg.dist.shard == "full":
        if cfg.ppo.lora_rank > 0 or cfg.ppo.train_layers > 0:
            raise ConfigError("--dist.shard full is for full fine-tuning: add --ppo.train-layers 0 and --ppo.lora-rank 0 "
                              "(LoRA or a few trained layers: leave --dist.shard none, DDP replicates them cheaply)")
        if cfg.ppo.kl_coef > 0:
            raise ConfigError("--dist.shard full keeps no reference copy of the policy: use --ppo.kl-coef 0")
        if cfg.ire.every > 0 and cfg.ire.batch_size < world:
            raise ConfigError(f"--dist.shard full splits each supervised-stage batch over the ranks: --ire.batch-size "
                              f"must be at least --dist.nproc {world}")
        if cfg.ppo.cache_frozen_layers in ("on", True):
            raise ConfigError("--ppo.cache-frozen-layers needs frozen lower layers; with --dist.shard full every "
                              "layer trains: use --ppo.cache-frozen-layers auto")


def pin_cores(local_rank: int, local_world: int) -> list[int]:
    """This rank's share of the cores the process may use: its torch threads and its env workers (which inherit
    the mask) then never compete with another rank's."""
    cores = sorted(os.sched_getaffinity(0))
    k = len(cores) // local_world
    share = cores[local_rank * k:(local_rank + 1) * k] if k else [cores[local_rank % len(cores)]]
    os.sched_setaffinity(0, share)
    return share


def backend_of(cfg) -> str:
    if cfg.dist.backend != "auto":
        return cfg.dist.backend
    return "nccl" if cfg.device.startswith("cuda") else "gloo"


def prepare_rank(cfg, rank: int, world: int, local_rank: int, local_world: int, device: str | None = None) -> Comm:
    """This process as rank ``rank``: its device (its own GPU; its workers render there), its cores, and the
    config every rank shares. torch.distributed must be up, or come up next (``init_rank``)."""
    backend = backend_of(cfg)
    if cfg.device.startswith("cuda"):
        cfg.device = device or f"cuda:{local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(cfg.device))
        if cfg.env.render_device == "auto":
            cfg.env.render_device = cfg.device
    if cfg.dist.pin_cores and hasattr(os, "sched_setaffinity"):
        share = pin_cores(local_rank, local_world)
        if not cfg.threads:
            torch.set_num_threads(len(share))
    cfg.dist.nproc = world
    return Comm(rank=rank, world=world, local_rank=local_rank,
                device=cfg.device if backend == "nccl" else "cpu")


def init_rank(cfg, rank: int, world: int, local_rank: int, local_world: int) -> Comm:
    """Join the process group (MASTER_ADDR and MASTER_PORT in the environment) as rank ``rank``."""
    import torch.distributed as dist
    comm = prepare_rank(cfg, rank, world, local_rank, local_world)
    dist.init_process_group(backend_of(cfg), rank=rank, world_size=world,
                            timeout=timedelta(minutes=cfg.dist.timeout_min))
    return comm


def run_rank(cfg, rank: int, world: int, local_rank: int, local_world: int) -> dict:
    import torch.distributed as dist

    from ..train import train
    comm = init_rank(cfg, rank, world, local_rank, local_world)
    try:
        return train(cfg, comm)
    finally:
        # the run's DistributedDataParallel goes first, while the group is alive: a reducer holding the last
        # reference would tear the group down with the GIL held, and gloo's thread, waiting for the GIL to free
        # a finished collective's tensors, would never join
        gc.collect()
        dist.destroy_process_group()


def _spawned(index: int, cfg, world: int, port: int, errors) -> None:
    from ..cli import package_errors
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        run_rank(cfg, index, world, index, world)
    except package_errors() as e:   # the launcher prints the first rank's message, once
        errors.put(f"error: {e}")
        sys.exit(2)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        errors.put(e.code if e.code.startswith("error:") else f"error: {e.code}")
        sys.exit(2)


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(cfg) -> int:
    """``--dist.nproc N`` ranks as processes of this machine. The first Ctrl-C reaches every rank, which save a
    checkpoint and stop together; a second one, or a rank that dies, stops them all (their env workers die with
    them)."""
    import torch.multiprocessing as mp
    n = cfg.dist.nproc
    errors = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_spawned, args=(cfg, n, free_port(), errors), nprocs=n, join=False,
                             start_method="spawn")
    interrupts = 0

    def on_interrupt(signum, frame):
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()

    old = signal.signal(signal.SIGINT, on_interrupt)
    try:
        while not ctx.join(timeout=1):
            pass
    except mp.ProcessExitedException as e:
        if e.exit_code == 2 and not errors.empty():
            raise SystemExit(errors.get()) from None   # the package's one-line error
        if e.exit_code == 130:
            return 130   # Ctrl-C: every rank saved its part of the checkpoint
        how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
        raise SystemExit(f"error: rank {e.error_index} of {n} died ({how}); the other ranks were stopped") from None
    except mp.ProcessRaisedException as e:
        print(e, file=sys.stderr)
        raise SystemExit(f"error: rank {e.error_index} of {n} failed (its traceback is above); the other ranks were "
                         "stopped") from None
    finally:
        signal.signal(signal.SIGINT, old)
    return 0


def launch(cfg) -> int:
    """Run ``vlarl-fast train`` as the configuration asks: one process, N local ranks, torchrun's ranks or Ray's."""
    from ..train import train
    from ..validate import check_config
    check_config(cfg)
    ranks = torchrun_ranks()
    world = ranks[1] if ranks is not None else cfg.dist.nproc
    if world > 1 or cfg.dist.ray is not None or cfg.dist.shard != "none":
        check_dist(cfg, world)
    if cfg.dist.ray is not None:
        from .ray_train import run_on_ray
        return run_on_ray(cfg)
    if ranks is not None:
        run_rank(cfg, *ranks)
        return 0
    if world == 1 and cfg.dist.shard == "none":
        train(cfg)
        return 0
    return spawn_local(cfg)   # FSDP2 needs a process group, of one rank too
