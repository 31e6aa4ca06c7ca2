"""The ranks as Ray Train workers (``--dist.ray ADDRESS``): Ray places them on the cluster's nodes and sets up
torch.distributed between them (TorchTrainer); each then runs ``train`` as a rank started by ``--dist.nproc``
would. What each asks of Ray (CPUs, GPUs, placement) comes from the options, never from a fixed count."""
from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path


def _rank_main(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from ..config import TrainConfig, _merge
    from ..train import train
    from .launch import prepare_rank
    cfg = _merge(TrainConfig(), loop_config["cfg"])
    ctx = ray.train.get_context()
    device = str(ray.train.torch.get_device()) if cfg.device.startswith("cuda") else None
    comm = prepare_rank(cfg, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                        ctx.get_local_world_size(), device=device)
    train(cfg, comm)   # the run's files are its report (rank 0 writes them into RUN_DIR)
    gc.collect()   # the run's DistributedDataParallel goes before Ray tears the process group down


def resources(cfg) -> dict:
    """What each rank asks Ray for."""
    gpu = cfg.device.startswith("cuda")
    out = {"CPU": cfg.dist.cpus_per_worker}
    if gpu:
        out["GPU"] = cfg.dist.gpus_per_worker or 1.0
    return out


def run_on_ray(cfg) -> int:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .launch import backend_of
    n = cfg.dist.nproc
    need = resources(cfg)
    if cfg.dist.ray == "local":
        # a Ray of this machine alone, large enough for the ranks whatever its core count
        ray.init(num_cpus=max(os.cpu_count() or 1, int(n * need["CPU"] + 1)))
    else:
        ray.init(address=cfg.dist.ray)
    out = Path(cfg.output_dir).resolve()
    cfg.output_dir = str(out)   # the workers may run in other directories (other nodes share it by a mount)
    trainer = TorchTrainer(
        _rank_main, train_loop_config={"cfg": dataclasses.asdict(cfg)},
        scaling_config=ScalingConfig(num_workers=n, use_gpu="GPU" in need, resources_per_worker=need,
                                     placement_strategy=cfg.dist.placement),
        torch_config=TorchConfig(backend=backend_of(cfg), timeout_s=int(cfg.dist.timeout_min * 60)),
        run_config=RunConfig(name="ray", storage_path=str(out)))   # Ray Train's own records: RUN_DIR/ray
    try:
        trainer.fit()
    finally:
        ray.shutdown()
    return 0
