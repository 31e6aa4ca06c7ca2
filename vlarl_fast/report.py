"""Run outputs a person reads: the per-task table, the success plot, summary.json."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def success_table(before: dict | None, after: dict | None, title: str = "Success per task",
                  heldout: tuple[dict | None, dict | None] | None = None):
    """A rich Table of per-task success (after SFT, after RL, delta); ``heldout``: the same pair on held-out
    layouts, as columns beside them (the suite's prefix then leaves the task names, to fit 80 columns)."""
    from rich.table import Table

    tasks = list((before or after)["per_task"])
    names = {t: t for t in tasks}
    groups = [("", before, after)]
    if heldout is not None and any(r is not None for r in heldout):
        groups = [("fixed\n", before, after), ("held-out\n", *heldout)]
        if len({t.partition("/")[0] for t in tasks}) == 1:
            names = {t: t.partition("/")[2] or t for t in tasks}
    table = Table(title=title)
    table.add_column("task", no_wrap=True)
    for prefix, b, a in groups:
        if b is not None:
            table.add_column(f"{prefix}SFT" if prefix else "after SFT", justify="right")
        if a is not None:
            table.add_column(f"{prefix}RL" if prefix else "after RL", justify="right")
        if b is not None and a is not None:
            table.add_column("delta", justify="right")
    for t in tasks + ["average"]:
        cells = []
        for _, b, a in groups:
            vals = [r["success"] if t == "average" else r["per_task"][t] for r in (b, a) if r is not None]
            cells += [f"{100 * v:.1f}%" for v in vals]
            if len(vals) == 2:
                cells.append(f"{100 * (vals[1] - vals[0]):+.1f}")
        table.add_row(names.get(t, t), *cells, style="bold" if t == "average" else None)
    return table


def plot_success(history: list[dict], evals: list[tuple[int, float, str]], path: Path) -> None:
    """Training success (episodes finished in each iteration) and evaluation points vs env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [h["env_steps"] for h in history if h["success"] == h["success"]]
    ys = [100 * h["success"] for h in history if h["success"] == h["success"]]
    if xs:
        ax.plot(xs, ys, "-o", ms=3, label="rollout success (sampled)")
    for step, value, label in evals:
        ax.scatter([step], [100 * value], s=60, zorder=3, label=label)
    ax.set_xlabel("environment steps (RL)")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_task_success(result: dict, path: Path, title: str = "Success per task") -> None:
    """Horizontal bars of success per task with the average, from an ``evaluate`` result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["per_task"])
    values = [100 * result["per_task"][t] for t in names]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.4))
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.axvline(100 * result["success"], color="tab:red", ls="--", label=f"average {100 * result['success']:.1f}%")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"success rate (%), {result['episodes']} episodes")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_videos(videos: dict[str, list[dict]], folder: Path, fmt: str = "gif", fps: int = 10) -> list[Path]:
    """One file per recorded episode: <task>_state<k>_<success|failure>.<fmt>. MP4 needs imageio-ffmpeg
    (`pip install imageio-ffmpeg`); GIF needs only Pillow."""
    import imageio.v3 as iio

    if fmt not in ("gif", "mp4"):
        raise ValueError(f"video format must be 'gif' or 'mp4'; got {fmt!r}")
    if fmt == "mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError("mp4 videos need imageio-ffmpeg: `pip install imageio-ffmpeg`, or use gif") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, episodes in videos.items():
        for k, ep in enumerate(episodes):
            name = f"{task.replace('/', '_')}_state{ep['init_state']}_{k}_{'success' if ep['success'] else 'failure'}"
            path = folder / f"{name}.{fmt}"
            if fmt == "gif":
                iio.imwrite(path, ep["frames"], duration=1000 / fps, loop=0)
            else:
                iio.imwrite(path, ep["frames"], fps=fps, codec="libx264")
            paths.append(path)
    return paths
