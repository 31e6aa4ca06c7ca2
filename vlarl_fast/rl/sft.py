"""Supervised fine-tuning (behaviour cloning) on demonstrations: cross-entropy on the 7
action tokens of each step, the whole model trained (vision tower included).

Adam steps float32 tensors only, as in PPO (docs/precision.md): a bfloat16 model keeps its 16-bit
weights for the forward and ``bc_optimizer`` gives AdamW their float32 master copies
(``precision.MasterWeights``); a float32 model trains exactly as with AdamW on its own weights."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..policy import NormStats, VLAPolicy
from ..policy.precision import MasterWeights, check_float32_optimizer, float32_training, mixed_precision


def demos_to_arrays(episodes: list[dict]) -> dict:
    if not episodes:
        raise ValueError("no demonstrations to train on (the expert produced no successful episode)")
    images = np.concatenate([e["images"] for e in episodes])
    states = np.concatenate([e["states"] for e in episodes]).astype(np.float32)
    actions = np.concatenate([e["actions"] for e in episodes]).astype(np.float32)
    instructions = [e["instruction"] for e in episodes for _ in range(len(e["actions"]))]
    return {"images": images, "states": states, "actions": actions, "instructions": instructions}


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """DrQ-style augmentation: replicate-pad by ``pad`` pixels, crop back at a random offset per image."""
    if pad <= 0:
        return images
    B, H, W, C = images.shape
    x = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (pad,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H)[None])[:, :, None].expand(B, H, W)
    cols = (dx[:, None] + torch.arange(W)[None])[:, None, :].expand(B, H, W)
    out = x[torch.arange(B)[:, None, None], :, rows, cols]  # [B, H, W, C]
    return out.round().clamp(0, 255).to(torch.uint8)


def bc_optimizer(policy: VLAPolicy, params, *, lr: float, weight_decay: float
                 ) -> tuple[torch.optim.AdamW, MasterWeights]:
    """AdamW over ``params`` that steps float32 tensors only, and the master copies ``bc_step`` keeps in sync.

    The split is PPO's (``precision.float32_training``): LoRA adapters and value heads become float32 in place,
    every other 16-bit weight gets a float32 master copy. On bfloat16 weights Adam's steps of a relative
    1e-4 fall below half a bfloat16 step and round away; the masters accumulate them. A float32 model gets
    no master copies: AdamW then steps its weights themselves."""
    params = list(params)
    masters = float32_training(policy, params)
    opt = torch.optim.AdamW(masters.of(params), lr=lr, weight_decay=weight_decay)
    check_float32_optimizer(opt)
    return opt, masters


def bc_step(policy: VLAPolicy, opt: torch.optim.Optimizer, images: np.ndarray, states: np.ndarray,
            instructions: list[str], tokens: torch.Tensor, *, augment_pad: int = 0,
            generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None,
            masters: MasterWeights | None = None, forward=None) -> float:
    """One behaviour-cloning gradient step (mean token cross-entropy); returns the loss.

    ``autocast_dtype`` (e.g. bfloat16): the forward's matrix products in that dtype, the float32 weights
    and optimiser untouched (``precision.resolve_bc_autocast`` picks it). ``masters``: the float32 master
    copies ``opt`` steps in place of 16-bit weights (``bc_optimizer``); the model's weights are rounded from
    them after the step. ``opt`` must step float32 tensors only (``PrecisionError`` otherwise). ``forward``:
    runs the loss's computation, as ``forward(fn)`` (a sharded model's root unit, dist/fsdp.py)."""
    check_float32_optimizer(opt)
    model = policy.model
    imgs, st = policy.to_tensor_obs(images, states)
    if augment_pad:
        imgs = random_shift(imgs.cpu(), augment_pad, generator).to(imgs.device)
    text_ids, text_mask = policy.encode_prompts(instructions)

    def bc_loss() -> torch.Tensor:
        with mixed_precision(policy.device, autocast_dtype):
            feats = model.encode_images(model.preprocess_images(imgs))
            logp, _, _ = policy.evaluate_actions(feats, st, text_ids, text_mask, tokens.to(policy.device))
            return -logp.mean()
    loss = bc_loss() if forward is None else forward(bc_loss)
    gradient_step(model, opt, loss, masters)
    return float(loss.detach())


def gradient_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor,
                  masters: MasterWeights | None = None) -> None:
    """Backward, then one step of ``opt`` (``bc_optimizer``'s) with the gradient norm clipped at 1, through the
    float32 master copies where the model's weights are 16-bit."""
    opt.zero_grad(set_to_none=True)
    if masters is not None:
        # the optimiser clears only the masters' gradients: a 16-bit one left by anything else would add
        # into this step's
        for p, _ in masters.pairs:
            p.grad = None
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    if masters is not None:
        masters.grads_to_masters()
        trained = masters.of(trained)
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    opt.step()
    if masters is not None:
        masters.masters_to_model()


def lr_factor(step: int, total: int, warmup_steps: int = 0, floor: float = 0.1) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then cosine decay to ``floor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))


class WeightEMA:
    """Exponential moving average of the tensors an optimiser steps (Polyak averaging), kept in float32.

    Behaviour cloning ends wherever the last minibatches left the weights; the average over the last
    ~1 / (1 - decay) steps is a flatter point, and the policy it gives varies less from seed to seed. The
    decay ramps up as ``(1 + step) / (10 + step)`` so the first steps do not anchor it to the initial weights."""

    def __init__(self, tensors: list[torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.tensors, self.decay, self.steps = list(tensors), decay, 0
        self.shadow = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [t.detach() for t in self.tensors], 1.0 - decay)

    @torch.no_grad()
    def copy_to_tensors(self) -> None:
        torch._foreach_copy_(self.tensors, self.shadow)


def sft_train(policy: VLAPolicy, data: dict, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
              seed: int, fit_stats: bool = True, augment_pad: int = 0, warmup_steps: int = 0, progress=None,
              log=None, autocast_dtype: torch.dtype | None = None, ema_decay: float = 0.0) -> list[float]:
    """Behaviour cloning; fits q01/q99 action statistics from the data first (if asked).

    The learning rate rises linearly over ``warmup_steps``, then decays by a cosine to 10%. ``ema_decay`` > 0:
    the policy ends with the moving average of its trained weights (``WeightEMA``) instead of the last step's.

    Returns the mean loss per epoch."""
    if fit_stats or policy.norm_stats is None:
        policy.norm_stats = NormStats.from_actions(data["actions"])
    tokens = policy.tokens_from_actions(data["actions"])
    n = len(tokens)
    model = policy.model
    model.train()
    opt, masters = bc_optimizer(policy, [p for p in model.parameters() if p.requires_grad], lr=lr,
                                weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup_steps))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    # over what the optimiser steps: the float32 masters of 16-bit weights, float32 weights themselves
    ema = WeightEMA([p for g in opt.param_groups for p in g["params"]], ema_decay) if ema_decay > 0 else None
    losses = []
    for epoch in range(epochs):
        perm = rng.permutation(n)
        tot, cnt = 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            loss = bc_step(policy, opt, data["images"][idx], data["states"][idx],
                           [data["instructions"][i] for i in idx], tokens[idx], augment_pad=augment_pad, generator=gen,
                           autocast_dtype=autocast_dtype, masters=masters)
            sched.step()
            if ema is not None:
                ema.update()
            tot += loss * len(idx)
            cnt += len(idx)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
        losses.append(tot / cnt)
        if log is not None:
            log(epoch, losses[-1])
    if ema is not None:
        ema.copy_to_tensors()
        if masters is not None:
            masters.masters_to_model()
    model.eval()
    return losses
