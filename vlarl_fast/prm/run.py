"""`vlarl-fast prm`: trajectories -> segments -> pseudo labels -> a reward model, measured on held-out episodes."""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import torch

from ..config import env_options
from ..envs import get_task
from ..report import write_json_atomic
from ..train import _bar, _Logger, prepare_output_dir, resolve_tasks, start_run
from .config import PRMConfig
from .episodes import expert_episodes, load_episodes, policy_episodes, save_episodes
from .fit import evaluate_frames, fit, frames_of, split_episodes
from .labels import IGNORE, POSITIVE, pseudo_labels
from .model import MODEL_DIR, RewardModel, question_text
from .plots import plot_episode
from .segment import keyframes


def collect(cfg: PRMConfig, tasks: list[str], console) -> list[dict]:
    """Every source the config names: the expert's episodes, a policy's rollouts, saved episode files."""
    d = cfg.data
    if cfg.env.benchmark != "tabletop" and d.policy is None and d.episodes is None:
        raise SystemExit(f"error: {cfg.env.benchmark} has no scripted expert: name a policy checkpoint to roll out "
                         "with --data.policy CHECKPOINT (or saved episodes with --data.episodes DIR)")
    episodes: list[dict] = []
    if cfg.env.benchmark == "tabletop" and d.expert_episodes > 0:
        with _bar(len(tasks) * d.expert_episodes, "expert episodes", cfg.progress) as bar:
            episodes += expert_episodes(tasks, d.expert_episodes, tuple(d.expert_noise), d.layouts, cfg.seed,
                                        cfg.env.image_size, progress=bar)
    if d.policy is not None and d.policy_episodes > 0:
        from ..policy import make_policy
        policy = make_policy(d.policy, instructions=[get_task(t).instruction for t in tasks],
                             image_size=cfg.env.image_size, seed=cfg.seed, device=cfg.device, dtype=cfg.model.dtype)
        split = "open" if cfg.env.benchmark == "tabletop" else "fixed"
        with _bar(len(tasks) * d.policy_episodes, "policy rollouts", cfg.progress) as bar:
            episodes += policy_episodes(policy, tasks, d.policy_episodes, split=split, num_envs=cfg.env.num_envs,
                                        image_size=cfg.env.image_size, seed=cfg.seed + 1, temperature=d.temperature,
                                        progress=bar, env_options=env_options(cfg.env), backend=cfg.env.backend,
                                        render_device=cfg.env.render_device)
        del policy
    if d.episodes is not None:
        loaded = load_episodes(d.episodes)
        console.print(f"loaded {len(loaded)} episodes from {d.episodes}")
        episodes += loaded
    if not episodes:
        raise SystemExit("error: no episodes to learn from: set --data.expert-episodes, --data.policy or "
                         "--data.episodes")
    return episodes


def spread(items: list[int], k: int) -> list[int]:
    """Up to ``k`` items evenly spaced over the list (episodes come task by task: every task gets its turn)."""
    if k <= 0 or not items:
        return []
    return [items[j] for j in sorted(set(np.linspace(0, len(items) - 1, min(k, len(items))).round().astype(int)))]


def build_model(cfg: PRMConfig, instructions: list[str]) -> RewardModel:
    """A fresh tiny VLA, or a checkpoint to start from; its head is reset so that every frame starts at
    P = 0.5, and with --model.lora-rank only LoRA adapters and the head learn."""
    from ..policy import make_policy
    m = cfg.model
    questions = [question_text(ins, m.question) for ins in instructions]
    policy = make_policy(m.backbone, instructions=questions, image_size=cfg.env.image_size, seed=cfg.seed,
                         device=cfg.device, dtype=m.dtype,
                         **({"hidden_size": m.hidden_size, "num_layers": m.num_layers} if m.backbone == "tiny" else {}))
    head = policy.model.value_head
    torch.nn.init.zeros_(head[-1].weight)
    torch.nn.init.zeros_(head[-1].bias)
    policy.set_critic("shared")
    if m.lora_rank > 0:
        from ..policy.lora import add_lora
        add_lora(policy.model, rank=m.lora_rank, alpha=2.0 * m.lora_rank)
        head_ids = {id(p) for p in head.parameters()}
        for name, p in policy.model.named_parameters():
            p.requires_grad_("lora_" in name or id(p) in head_ids)
    return RewardModel(policy, m.question)


def run_prm(cfg: PRMConfig) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t_start = time.perf_counter()
    start_run(cfg)
    out = prepare_output_dir(cfg.output_dir)
    tasks = resolve_tasks(cfg)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    logger = _Logger(out, cfg.tensorboard)
    timings: dict[str, float] = {}

    # ---- 1. trajectories --------------------------------------------------------------------
    t0 = time.perf_counter()
    episodes = collect(cfg, tasks, console)
    timings["collect_s"] = time.perf_counter() - t0
    if cfg.save_episodes:
        save_episodes(out / "episodes", episodes)
    n_success = sum(ep["success"] for ep in episodes)
    console.print(f"episodes: {len(episodes)} ({n_success} successes, {len(episodes) - n_success} failures), "
                  f"{sum(len(ep['images']) for ep in episodes)} frames ({timings['collect_s']:.0f} s)")

    # ---- 2. segments and pseudo labels ------------------------------------------------------
    keys = [keyframes(ep["actions"][:, 6], ep["ee_pos"], cfg.segment) for ep in episodes]
    labels = [pseudo_labels(len(ep["images"]), k, ep["success"], cfg.labels) for ep, k in zip(episodes, keys)]
    train_ids, val_ids = split_episodes([ep["success"] for ep in episodes], cfg.data.val_fraction, cfg.seed)
    split_of = {int(i): "val" for i in val_ids} | {int(i): "train" for i in train_ids}
    write_json_atomic(out / "labels.json", [
        {"episode": i, "file": f"episodes/episode_{i:05d}.npz" if cfg.save_episodes else None,
         "task_id": ep.get("task_id"), "instruction": ep["instruction"], "success": ep["success"],
         "split": split_of[i], "frames": len(lab), "keyframes": k.tolist(), "labels": lab.tolist()}
        for i, (ep, k, lab) in enumerate(zip(episodes, keys, labels))])

    # ---- 3. the reward model ----------------------------------------------------------------
    train, val = frames_of(episodes, labels, train_ids), frames_of(episodes, labels, val_ids)
    rm = build_model(cfg, sorted({ep["instruction"] for ep in episodes}))
    t0 = time.perf_counter()
    steps = cfg.train.epochs * -(-len(train["labels"]) // cfg.train.batch_size)
    with _bar(steps, "reward model", cfg.progress) as bar:
        try:
            losses = fit(rm, train, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
                         lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay, seed=cfg.seed, progress=bar,
                         log=lambda e, l: logger.scalars("prm", {"loss": l}, e))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    timings["fit_s"] = time.perf_counter() - t0
    train_metrics, _ = evaluate_frames(rm, train)
    val_metrics, _ = evaluate_frames(rm, val) if len(val["labels"]) else ({}, None)
    logger.scalars("prm_val", {k: v for k, v in val_metrics.items() if isinstance(v, float)}, cfg.train.epochs)
    rm.meta = {"image_size": cfg.env.image_size, "benchmark": cfg.env.benchmark, "tasks": tasks,
               "val": val_metrics, "train": train_metrics, "segment": dataclasses.asdict(cfg.segment),
               "labels": dataclasses.asdict(cfg.labels)}
    rm.save(out / MODEL_DIR)

    # ---- 4. pictures and the summary --------------------------------------------------------
    if cfg.plots > 0:
        (out / "plots").mkdir(exist_ok=True)
        pool = val_ids if len(val_ids) else train_ids
        wins = [int(i) for i in pool if episodes[i]["success"]]
        shown = spread(wins, (cfg.plots + 1) // 2)
        shown += spread([int(i) for i in pool if int(i) not in shown], cfg.plots - len(shown))
        for i in shown:
            ep = episodes[i]
            probs = rm.score(ep["images"], ep["states"], [ep["instruction"]] * len(ep["images"]))
            plot_episode(ep, labels[i], keys[i], probs, out / "plots" / f"episode_{i:05d}.png")
    n_pos = int(sum((lab == POSITIVE).sum() for lab in labels))
    n_ign = int(sum((lab == IGNORE).sum() for lab in labels))
    n_all = int(sum(len(lab) for lab in labels))
    summary = {"tasks": tasks, "seed": cfg.seed, "episodes": len(episodes), "successes": int(n_success),
               "frames": n_all, "positives": n_pos, "negatives": n_all - n_pos - n_ign, "ignored": n_ign,
               "train_episodes": len(train_ids), "val_episodes": len(val_ids),
               "keyframes_per_success": float(np.mean([len(k) for ep, k in zip(episodes, keys) if ep["success"]]))
               if n_success else None,
               "loss": losses, "train": train_metrics, "val": val_metrics, "timings_s": timings,
               "wall_time_s": time.perf_counter() - t_start, "reward_model": str(out / MODEL_DIR)}
    write_json_atomic(out / "summary.json", summary)
    logger.close()
    table = Table(title="Reward model: frames of held-out episodes" if val_metrics else "Reward model")
    for c in ("frames", "positives", "accuracy", "balanced acc.", "ROC AUC"):
        table.add_column(c, justify="right")
    for name, m in (("train", train_metrics), ("held-out", val_metrics)):
        if m:
            table.add_row(f"{m['frames']} ({name})", str(m["positives"]), f"{100 * m['accuracy']:.1f}%",
                          f"{100 * m['balanced_accuracy']:.1f}%", f"{m['auc']:.3f}")
    console.print(table)
    console.print(f"wrote {out / MODEL_DIR} (use it with `vlarl-fast train --reward.prm {out}`), labels.json, "
                  f"summary.json{', plots/' if cfg.plots else ''} ({summary['wall_time_s']:.0f} s)")
    return summary
