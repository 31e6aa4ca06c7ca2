"""The ranks of a data-parallel run and what they exchange.

A run of one process uses ``SINGLE``, whose collectives return their input: the single-process code path is the
distributed one with a world of one, so nothing branches on whether torch.distributed is up.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Comm:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"   # where collective tensors live: the rank's GPU under NCCL, the CPU under gloo

    @property
    def main(self) -> bool:
        """Rank 0: the rank that writes the run's files and prints."""
        return self.rank == 0

    def _dist(self):
        import torch.distributed as dist
        return dist

    def _reduce(self, values, op: str) -> np.ndarray:
        x = np.asarray(values, dtype=np.float64)   # float64 on the wire
        if self.world == 1:
            return x
        dist = self._dist()
        t = torch.as_tensor(x, device=self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.cpu().numpy()

    def sum(self, values) -> np.ndarray:
        """Elementwise sum over the ranks of a float vector."""
        return self._reduce(values, "SUM")

    def max(self, values) -> np.ndarray:
        return self._reduce(values, "MAX")

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one: the decisions ranks must take together (skip an update,
        stop the run)."""
        return bool(self.max([float(flag)])[0] > 0)

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self._dist().all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        self._dist().broadcast_object_list(box, src=0, device=torch.device(self.device))
        return box[0]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers into every rank's copy of ``module``, in place."""
        self.broadcast_tensors([t.data if isinstance(t, torch.nn.Parameter) else t
                                for t in module.state_dict(keep_vars=True).values()])

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of ``tensors`` into every rank's, in place."""
        if self.world == 1:
            return
        dist = self._dist()
        for t in tensors:
            if t.device.type == torch.device(self.device).type:
                dist.broadcast(t, src=0)
            else:   # NCCL moves CUDA tensors only
                buf = t.to(self.device)
                dist.broadcast(buf, src=0)
                t.copy_(buf)

    def barrier(self) -> None:
        if self.world > 1:
            self._dist().barrier()


SINGLE = Comm()
