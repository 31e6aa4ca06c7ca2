"""iRe-VLA's supervised stage, run between RL stages.

RL updates only the top of the policy (``--ppo.train-layers``): a policy gradient is too noisy
to move a whole freshly fitted model without losing its skill. The supervised stage is how the
rest of the model (vision tower included) learns from online experience: behaviour cloning on
the expert demonstrations plus the policy's own successful episodes, a stable loss whichever
parameters it touches. Each batch takes ``online_fraction`` of its rows from the successful
episodes and the rest from the demonstrations, so the new data carries weight as soon as there
is any and the demonstrations keep anchoring what RL has not visited yet.

A bfloat16 model is trained through float32 master copies, as PPO trains it (``sft.bc_optimizer``,
docs/precision.md). The stage's copies live as long as its optimiser; PPO and the stage each take the
other's writes to the shared weights into their own masters before stepping again.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ..dist.comm import SINGLE, Comm
from ..dist.fsdp import sync_buffers
from ..policy import VLAPolicy
from ..policy.precision import MasterWeights
from .sft import bc_optimizer, bc_step


@contextmanager
def all_trainable_but_value(model):
    """Unfreeze every parameter but the value head for the stage; restore the RL flags after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    value_ids = {id(p) for p in model.value_head.parameters()}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) not in value_ids)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class SupervisedStage:
    def __init__(self, policy: VLAPolicy, expert: dict | None, *, steps: int, batch_size: int, learning_rate: float,
                 online_fraction: float, weight_decay: float = 0.01, seed: int = 0, balance_tasks: bool = False,
                 autocast_dtype: torch.dtype | None = None, comm: Comm = SINGLE, root: torch.nn.Module | None = None):
        if steps < 0 or batch_size <= 0:
            raise ValueError(f"the supervised stage needs steps >= 0 and batch_size > 0; got {steps}, {batch_size}")
        if not 0.0 <= online_fraction <= 1.0:
            raise ValueError(f"--ire.online-fraction must be in [0, 1]; got {online_fraction}")
        self.policy = policy
        self.expert = expert
        # demonstration labels are tokenised once with the statistics SFT fitted
        self.expert_tokens = None if expert is None else policy.tokens_from_actions(expert["actions"]).cpu()
        self.steps, self.batch_size, self.online_fraction = steps, batch_size, online_fraction
        self.lr, self.weight_decay = learning_rate, weight_decay
        self.balance_tasks = balance_tasks
        self.autocast_dtype = autocast_dtype
        self.rng = np.random.default_rng(seed)
        self.optimizer: torch.optim.Optimizer | None = None   # kept across stages (Adam moments stay warm)
        self.masters: MasterWeights | None = None   # float32 copies of the 16-bit weights the optimiser steps
        self.stages = 0
        # a sharded model (dist/fsdp.py): every rank runs the stage on the same rows drawn by the same RNG, each
        # on its share of every batch, through the root unit, whose backward averages the ranks' gradients
        self.comm, self.root = comm, root

    def _make_optimizer(self) -> None:
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        self.optimizer, self.masters = bc_optimizer(self.policy, params, lr=self.lr, weight_decay=self.weight_decay)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the stages exactly: the optimiser's moments, the masters, the
        row sampler's RNG and the stage count."""
        return {"stages": self.stages, "rng": self.rng.bit_generator.state,
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "masters": None if self.masters is None else self.masters.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stages = state["stages"]
        self.rng.bit_generator.state = state["rng"]
        if state["optimizer"] is not None:
            with all_trainable_but_value(self.policy.model):
                self._make_optimizer()
            if state["optimizer"] == "sharded":   # its moments are in the checkpoint's sharded/ (checkpointing.py)
                return
            self.optimizer.load_state_dict(state["optimizer"])
            self.masters.load_state_dict(state["masters"])

    def _split(self, n_online_rows: int) -> tuple[int, int]:
        """Rows per batch from (online, expert)."""
        if n_online_rows == 0:
            return 0, self.batch_size
        if self.expert is None:
            return self.batch_size, 0
        k = int(round(self.batch_size * self.online_fraction))
        return k, self.batch_size - k

    @staticmethod
    def _row_weights(instructions: list[str]) -> np.ndarray:
        """Sampling weights giving every task (instruction) the same share of the online rows, so the rare
        successes of a hard task are not drowned by the many short ones of an easy task."""
        names, inverse, counts = np.unique(np.asarray(instructions), return_inverse=True, return_counts=True)
        w = 1.0 / counts[inverse]
        return w / w.sum()

    def run(self, online: dict | None) -> dict:
        """``self.steps`` behaviour-cloning steps on demonstrations + ``online`` (``SuccessfulEpisodes.arrays()``)."""
        n_on = 0 if online is None else len(online["tokens"])
        if n_on == 0 and self.expert is None:
            return {"loss": float("nan"), "online_steps": 0, "steps": 0}
        k_on, k_ex = self._split(n_on)
        pol, model = self.policy, self.policy.model
        online_tokens = None if online is None else torch.as_tensor(online["tokens"])
        p_online = self._row_weights(online["instructions"]) if n_on and self.balance_tasks else None
        losses = []
        with all_trainable_but_value(model):
            if self.optimizer is None:
                self._make_optimizer()
            else:
                # PPO stepped some of these weights since the last stage: they, not the masters this stage
                # left behind, are the weights to continue from
                self.masters.refresh()
            model.train()
            for _ in range(self.steps):
                parts = []
                if k_on:
                    i = self.rng.choice(n_on, size=k_on, p=p_online)
                    parts.append((online["images"][i], online["states"][i], [online["instructions"][j] for j in i],
                                  online_tokens[i]))
                if k_ex:
                    i = self.rng.integers(len(self.expert_tokens), size=k_ex)
                    parts.append((self.expert["images"][i], self.expert["states"][i],
                                  [self.expert["instructions"][j] for j in i], self.expert_tokens[i]))
                images = np.concatenate([p[0] for p in parts])
                states = np.concatenate([p[1] for p in parts]).astype(np.float32)
                instructions = [s for p in parts for s in p[2]]
                tokens = torch.cat([p[3] for p in parts])
                if self.root is not None:
                    mine = np.arange(self.comm.rank, len(tokens), self.comm.world)
                    images, states, tokens = images[mine], states[mine], tokens[mine]
                    instructions = [instructions[j] for j in mine]
                losses.append(bc_step(pol, self.optimizer, images, states, instructions, tokens,
                                      autocast_dtype=self.autocast_dtype, masters=self.masters, forward=self.root))
            # the last step's gradients go now: they would hold a model's worth of memory until PPO's next step
            model.zero_grad(set_to_none=True)
            model.eval()
        self.stages += 1
        loss = float(np.mean(losses)) if losses else float("nan")
        if self.root is not None:
            sync_buffers(self.root, self.comm)
            loss = float(self.comm.sum([loss])[0]) / self.comm.world   # each rank's share of the rows
        return {"loss": loss, "online_steps": n_on, "steps": len(losses)}
