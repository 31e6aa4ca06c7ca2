"""A picture of the pseudo labels: an episode's frames above its labels and the reward model's scores."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .labels import IGNORE, POSITIVE


def plot_episode(ep: dict, labels: np.ndarray, keyframes: np.ndarray, probs: np.ndarray | None, path: Path,
                 thumbnails: int = 6) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(ep["images"])
    shown = np.unique(np.linspace(0, T - 1, thumbnails).round().astype(int))
    fig = plt.figure(figsize=(1.6 * max(len(shown), 4), 4.6))
    grid = fig.add_gridspec(2, len(shown), height_ratios=[1, 1.3])
    for j, t in enumerate(shown):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(ep["images"][t])
        ax.set_title(f"t={t}" + (" (key)" if t in set(keyframes.tolist()) else ""), fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    steps = np.arange(T)
    pos, ign = labels == POSITIVE, labels == IGNORE
    neg = ~pos & ~ign
    ax.scatter(steps[pos], np.ones(pos.sum()), marker="s", s=14, color="tab:green", label="positive")
    ax.scatter(steps[neg], np.zeros(neg.sum()), marker="s", s=14, color="tab:red", label="negative")
    ax.scatter(steps[ign], np.full(ign.sum(), 0.5), marker="s", s=8, color="0.7", label="ignored")
    for k in keyframes:
        ax.axvline(k, color="tab:blue", lw=0.8, alpha=0.6)
    if probs is not None:
        ax.plot(steps, probs, color="black", lw=1.2, label="P(completed)")
    ax.set_ylim(-0.08, 1.08)
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_xlabel("step (blue lines: keyframes)")
    ax.set_title(f"{ep['instruction']} ({'success' if ep['success'] else 'failure'})", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
