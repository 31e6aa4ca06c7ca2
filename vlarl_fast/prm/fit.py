"""Training the reward model as a binary classifier on pseudo-labelled frames, and its held-out metrics."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..rl.sft import bc_optimizer, gradient_step, lr_factor
from .labels import IGNORE
from .model import RewardModel


def split_episodes(successes: list[bool], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Episode indices (train, validation), the validation share taken from successes and failures alike, so
    both sides hold each kind whenever there are two of it."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--data.val-fraction must be in [0, 1); got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    s = np.asarray(successes, dtype=bool)
    for group in (np.flatnonzero(s), np.flatnonzero(~s)):
        group = rng.permutation(group)
        k = int(round(val_fraction * len(group)))
        if val_fraction > 0 and len(group) >= 2:
            k = min(max(k, 1), len(group) - 1)
        val += group[:k].tolist()
        train += group[k:].tolist()
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def frames_of(episodes: list[dict], labels: list[np.ndarray], which) -> dict:
    """The labelled frames (IGNORE left out) of episodes ``which``."""
    imgs, states, ys, ins = [], [], [], []
    for i in which:
        keep = labels[i] != IGNORE
        imgs.append(episodes[i]["images"][keep])
        states.append(episodes[i]["states"][keep])
        ys.append(labels[i][keep])
        ins += [episodes[i]["instruction"]] * int(keep.sum())
    if not ys:
        return {"images": np.zeros((0, 1, 1, 3), np.uint8), "states": np.zeros((0, 1), np.float32),
                "labels": np.zeros(0, np.int8), "instructions": []}
    return {"images": np.concatenate(imgs), "states": np.concatenate(states).astype(np.float32),
            "labels": np.concatenate(ys), "instructions": ins}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative
    (ties count half), by the rank-sum (Mann-Whitney U) statistic; NaN without both classes."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = 0.5 * (a + b - 1) + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    n = len(labels)
    return {"frames": n, "positives": int(labels.sum()),
            "accuracy": float((pred == labels).mean()) if n else math.nan,
            "balanced_accuracy": float(np.mean([(pred[labels]).mean(), (~pred[~labels]).mean()]))
            if labels.any() and (~labels).any() else math.nan,
            "auc": roc_auc(probs, labels)}


def fit(rm: RewardModel, train: dict, *, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int,
        warmup_steps: int = 50, progress=None, log=None) -> list[float]:
    """Binary cross-entropy on the frames' labels, positives weighted by the negatives-to-positives ratio so
    that neither class dominates; AdamW with warm-up and cosine decay. Returns the mean loss per epoch."""
    y = torch.as_tensor(train["labels"], dtype=torch.float32)
    n = len(y)
    n_pos = float(y.sum())
    if n == 0 or n_pos == 0 or n_pos == n:
        raise ValueError(f"the reward model needs positive and negative frames to learn from; the training episodes "
                         f"gave {int(n_pos)} positives and {int(n - n_pos)} negatives (collect more episodes, failures "
                         "too: --data.expert-noise with large noise levels, or --data.policy rollouts)")
    pos_weight = torch.tensor((n - n_pos) / n_pos, device=rm.device)
    model = rm.policy.model
    model.train()
    opt, masters = bc_optimizer(rm.policy, [p for p in model.parameters() if p.requires_grad], lr=lr,
                                weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup_steps))
    rng = np.random.default_rng(seed)
    losses = []
    for epoch in range(epochs):
        perm = rng.permutation(n)
        tot = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            logits = rm.logits(train["images"][idx], train["states"][idx], [train["instructions"][i] for i in idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx].to(rm.device),
                                                                        pos_weight=pos_weight)
            gradient_step(model, opt, loss, masters)
            sched.step()
            tot += float(loss.detach()) * len(idx)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
        losses.append(tot / n)
        if log is not None:
            log(epoch, losses[-1])
    model.eval()
    return losses


def evaluate_frames(rm: RewardModel, frames: dict, batch_size: int = 256) -> tuple[dict, np.ndarray]:
    probs = rm.score(frames["images"], frames["states"], frames["instructions"], batch_size=batch_size)
    return classification_metrics(probs, frames["labels"]), probs
