"""`vlarl-fast train`: SFT on scripted demos -> PPO -> evaluation, with every output a run needs."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, env_options, resolve_env, vector_options
from .dist.comm import SINGLE, Comm
from .envs import VectorEnv, check_ready, get_task, list_tasks, make_training_env
from .policy import NormStats, make_policy, save_policy
from .policy.protocol import enable_gradient_checkpointing
from .report import plot_success, success_table, write_json_atomic
from .validate import ConfigError, check_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(cfg) -> None:
    """What every command that trains does first: torch's threads, every seed, the benchmark's env defaults."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    try:
        cfg.env = resolve_env(cfg.env)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def prepare_output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"   # one per process: the ranks of a run probe the same folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to output directory {str(out)!r} ({e.strerror}); "
                         "choose another with --output-dir") from None
    return out


def resolve_tasks(cfg: TrainConfig) -> list[str]:
    tasks = list(cfg.env.tasks) or list_tasks(cfg.env.suite)
    for t in tasks:
        get_task(t)  # raises UnknownTaskError with suggestions
    return tasks


class _Logger:
    def __init__(self, out: Path, tensorboard: bool, purge_step: int | None = None):
        """``purge_step``: a resumed run's first step; TensorBoard drops what the interrupted run logged after it."""
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tb"), purge_step=purge_step)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def run_eval(policy, cfg: TrainConfig, tasks: list[str], label: str, split: str = "fixed", comm: Comm = SINGLE):
    """Evaluate on ``tasks``; with several ranks each evaluates its share of the tasks (on its share of the
    envs) and every rank gets the whole result."""
    from .dist.shared import eval_share, merge_evals
    from .rl.evaluate import count_episodes, evaluate
    if split == "fixed":
        states, per_state = cfg.eval.init_states, cfg.eval.episodes_per_state
    else:
        # one episode on each held-out layout: more scenes say more about generalisation than repeats
        states, per_state, label = cfg.eval.heldout_episodes, 1, f"{label}, {split}"
    mine = eval_share(tasks, comm)
    result = None
    if mine:
        n = count_episodes(mine, states, per_state, split=split)
        with _bar(n, f"eval ({label})", cfg.progress and comm.main) as bar:
            result = evaluate(policy, mine, init_states=states, episodes_per_state=per_state,
                              num_envs=max(1, cfg.env.num_envs // comm.world), image_size=cfg.env.image_size,
                              seed=cfg.seed + 10_000, greedy=cfg.eval.greedy, temperature=cfg.ppo.temperature,
                              progress=bar, env_options=env_options(cfg.env), backend=cfg.env.backend,
                              render_device=cfg.env.render_device, split=split)
    return merge_evals(comm.all_gather(result), tasks)


def check_heldout_episodes(cfg: TrainConfig, tasks: list[str]) -> None:
    """Fill in the held-out evaluation's default (every held-out layout on the tabletop suite, none on LIBERO),
    and fail before training when the one asked for cannot run."""
    from .envs import split_size
    from .envs.tabletop.tasks import HELDOUT_LAYOUTS
    if cfg.eval.heldout_episodes is None:
        cfg.eval.heldout_episodes = HELDOUT_LAYOUTS if cfg.env.benchmark == "tabletop" else 0
    k = cfg.eval.heldout_episodes
    if k == 0:
        return
    for t in tasks:
        try:
            n = split_size(t, "heldout")
        except ValueError as e:
            raise SystemExit(f"error: --eval.heldout-episodes {k}: {e}; set it to 0") from None
        if not 0 < k <= n:
            raise SystemExit(f"error: --eval.heldout-episodes {k} is outside [0, {n}] for {t} (it has {n} held-out "
                             "layouts; 0 skips the held-out evaluation)")


def make_curriculum(ppo, tasks: list[str], seed: int, comm: Comm = SINGLE):
    """VLA-RL's curriculum over the layouts RL practises on: the fixed initial states, or the open stream; with
    several ranks, each rank's draws its own and the statistics every rank's."""
    from .dist.shared import SharedCurriculum
    from .rl.curriculum import Curriculum, OpenCurriculum
    common = dict(temperature=ppo.curriculum_temperature, window=ppo.curriculum_window, floor=ppo.curriculum_floor,
                  seed=seed + 7919 * comm.rank)
    if ppo.layouts == "open":
        c = OpenCurriculum(tasks, fresh=ppo.curriculum_fresh, pool=ppo.curriculum_pool, stride=comm.world,
                           offset=comm.rank, **common)
    else:
        c = Curriculum({t: get_task(t).num_init_states for t in tasks}, **common)
    return c if comm.world == 1 else SharedCurriculum(c, comm)


def resolve_layouts(cfg: TrainConfig, tasks: list[str]) -> str:
    """The layouts RL practises on: --ppo.layouts open needs tasks that have an open stream (the tabletop
    suite's); 'auto' takes the open stream where every task has one, else the fixed initial states."""
    if cfg.ppo.layouts == "fixed":
        return "fixed"
    from .envs import split_size
    for t in tasks:
        try:
            split_size(t, "open")
        except ValueError as e:
            if cfg.ppo.layouts == "auto":
                return "fixed"
            raise SystemExit(f"error: --ppo.layouts {cfg.ppo.layouts}: {e}; use --ppo.layouts fixed") from None
    return "open"


def check_algo(cfg: TrainConfig) -> None:
    """What the group algorithms need, checked before anything is trained."""
    from .rl.groups import GROUP_ALGOS
    ppo = cfg.ppo
    if ppo.algo not in GROUP_ALGOS or ppo.iterations == 0:
        return
    why = (f"--ppo.group-size {ppo.group_size} must be >= 2 (a group compares its episodes)" if ppo.group_size < 2
           else f"--env.num-envs {cfg.env.num_envs} must be a multiple of --ppo.group-size {ppo.group_size} (a "
                "group's episodes run side by side)" if cfg.env.num_envs % ppo.group_size else
           "it needs --ppo.curriculum True (the curriculum deals each group's initial state)" if not ppo.curriculum
           else None)
    if why is not None:
        raise ConfigError(f"--ppo.algo {ppo.algo}: {why}")


def load_reward_model(cfg: TrainConfig):
    """--reward.prm: the reward model, loaded before anything is trained so that a wrong path fails at once."""
    if cfg.reward.prm is None:
        return None
    from .prm.model import RewardModel
    try:
        rm = RewardModel.load(cfg.reward.prm, device=cfg.device, dtype=cfg.policy.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --reward.prm: {e}") from None
    size = getattr(rm.policy.config, "image_size", None)
    if size is not None and cfg.env.image_size is not None and size != cfg.env.image_size:
        raise SystemExit(f"error: --reward.prm {cfg.reward.prm} scores {size} px images but the envs render "
                         f"{cfg.env.image_size} px: train the reward model at --env.image-size {cfg.env.image_size}")
    return rm


@contextlib.contextmanager
def _rng_untouched():
    """Leaves the global RNGs as they were, so an optional evaluation cannot change the training that follows."""
    state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


def load_resume(cfg: TrainConfig, comm: Comm = SINGLE) -> dict | None:
    """--resume RUN_DIR: the newest RL checkpoint of the run (this rank's part of it), or None for a fresh run."""
    if cfg.resume is None:
        return None
    from .rl import checkpointing
    path = checkpointing.latest(cfg.resume)
    if path is None:
        raise ConfigError(f"--resume {cfg.resume}: no RL checkpoint in {Path(cfg.resume) / 'checkpoints'} (rl-NNNNN "
                          "folders appear every --checkpoint-every iterations and on Ctrl-C); start the run again")
    return checkpointing.load(path, comm)


def resumed_env_steps(resumed: dict) -> int:
    """Env steps of every rank when the checkpoint was taken (the TensorBoard step a resumed run goes on from)."""
    history = resumed["extra"].get("history") or []
    return int(history[-1]["env_steps"]) if history else int(resumed["global_step"])


def evaluate_start(policy, cfg: TrainConfig, tasks: list[str], logger, timings: dict, console, comm: Comm = SINGLE):
    """The policy RL starts from, on the fixed initial states and (tabletop) the held-out layouts."""
    label = "after SFT" if not cfg.skip_sft else "start"
    t0 = time.perf_counter()
    sft_eval = run_eval(policy, cfg, tasks, label, comm=comm)
    timings["eval_sft_s"] = time.perf_counter() - t0
    console.print(f"{'after SFT' if not cfg.skip_sft else 'start policy'}: success {100 * sft_eval['success']:.1f}% "
                  f"over {sft_eval['episodes']} episodes")
    logger.scalars("eval", {"success": sft_eval["success"]}, 0)
    heldout_sft = None
    if cfg.eval.heldout_episodes:
        t0 = time.perf_counter()
        with _rng_untouched():
            heldout_sft = run_eval(policy, cfg, tasks, label, "heldout", comm)
        timings["eval_heldout_sft_s"] = time.perf_counter() - t0
        console.print(f"held-out layouts: success {100 * heldout_sft['success']:.1f}% over "
                      f"{heldout_sft['episodes']} episodes")
        logger.scalars("eval_heldout", {"success": heldout_sft["success"]}, 0)
    return sft_eval, heldout_sft


def build_rl(cfg: TrainConfig, policy, tasks: list[str], data, expert_data, bc_dtype, resumed, console,
             comm: Comm = SINGLE) -> dict:
    """The pieces RL runs with: envs (their slots' tasks; groups of K consecutive slots for the group
    algorithms; with several ranks, this rank's block of the slots), the curriculum, the group schedule, and
    iRe-VLA's episode buffer and (on rank 0, which runs it) supervised stage."""
    from .dist.shared import rank_slots
    from .rl.groups import GROUP_ALGOS, GroupSchedule, group_slot_tasks
    from .rl.ire import SupervisedStage
    from .rl.online_data import SuccessfulEpisodes
    grouped = cfg.ppo.algo in GROUP_ALGOS
    slot_task = group_slot_tasks(tasks, cfg.env.num_envs, cfg.ppo.group_size) if grouped else \
        [tasks[i % len(tasks)] for i in range(cfg.env.num_envs)]
    mine = rank_slots(cfg.env.num_envs, comm)
    first, slot_task = mine.start, slot_task[mine]
    split = {} if cfg.ppo.layouts == "fixed" else {"split": cfg.ppo.layouts}   # LIBERO's envs take no split
    fns = [(lambda t=t, i=i: make_training_env(t, image_size=cfg.env.image_size, reward=cfg.env.reward,
                                               seed=cfg.seed * 1000 + first + i, **split, **env_options(cfg.env)))
           for i, t in enumerate(slot_task)]
    curriculum = None
    if cfg.ppo.curriculum:
        curriculum = make_curriculum(cfg.ppo, tasks, cfg.seed, comm)
        if cfg.skip_sft and resumed is None and Path(cfg.policy.policy).is_dir():
            try:
                restored = curriculum.load(cfg.policy.policy)   # keep what was learnt about each pair
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
            if restored:
                console.print(f"curriculum: statistics of {len(restored)} tasks restored from {cfg.policy.policy}")
    recorder = stage = None
    if cfg.ire.every > 0:
        recorder = SuccessfulEpisodes(len(slot_task), cfg.ire.capacity)
    sharded = cfg.dist.shard == "full"
    if cfg.ire.every > 0 and (comm.main or sharded):   # sharded: every rank runs the stage on its share
        if data is None and cfg.env.benchmark == "tabletop":
            _, data = expert_data()   # the same demonstrations SFT saw (same seed)
        stage = SupervisedStage(policy, data, steps=cfg.ire.steps, batch_size=cfg.ire.batch_size,
                                learning_rate=cfg.ire.learning_rate, online_fraction=cfg.ire.online_fraction,
                                weight_decay=cfg.sft.weight_decay, seed=cfg.seed,
                                balance_tasks=cfg.ire.balance_tasks, autocast_dtype=bc_dtype, comm=comm)
    schedule = None
    if grouped:   # every episode start of a slot takes its group's next draw
        schedule = reset_options = GroupSchedule(slot_task, cfg.ppo.group_size, curriculum.sample)
    else:
        reset_options = None if curriculum is None else (lambda i: {"init_state": curriculum.sample(slot_task[i])})
    envs = VectorEnv(fns, **vector_options(cfg.env), reset_options=reset_options)
    return {"envs": envs, "curriculum": curriculum, "schedule": schedule, "recorder": recorder, "stage": stage}


def iteration_line(st, prm: bool, grouped: bool, kl: bool) -> str:
    """One iteration's line of the log."""
    return (f"iter {st.iteration:3d} | steps {st.env_steps:7d} | SPS {st.sps:5.0f} | "
            f"success {st.success:5.2f} ({st.episodes:3d} ep) | return {st.episode_return:6.3f} | "
            f"approx_kl {st.approx_kl:6.4f} | clipfrac {st.clipfrac:5.3f} | "
            f"explained_var {st.explained_variance:5.2f} | v_loss {st.v_loss:6.4f} | "
            f"entropy {st.entropy:5.3f}{' | critic warm-up' if st.critic_only else ''}"
            f"{f' | prm {st.prm_seconds:.1f} s' if prm else ''}"
            f"{f' | groups {st.groups_kept} kept, {st.groups_dropped} dropped' if grouped else ''}"
            f"{f' | kl_ref {st.kl_ref:.4f}' if kl else ''}"
            f"{f' | {st.lost_steps} steps lost to env restarts' if st.lost_steps else ''}"
            f"{f' | skipped {st.skipped_updates} non-finite updates' if st.skipped_updates else ''}")


class _StopRequest:
    """The first Ctrl-C during RL asks for a checkpoint at the end of the iteration under way; a second one stops
    at once (workers ignore SIGINT: the manager closes them)."""

    def __init__(self, console):
        self.requested = False
        self.console = console
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.console.print("\nCtrl-C: finishing this iteration, then saving a checkpoint (Ctrl-C again stops at once)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def train(cfg: TrainConfig, comm: Comm = SINGLE) -> dict:
    """The whole run; ``comm``: this rank of a data-parallel run (dist/launch.py starts the ranks), of which
    rank 0 alone runs SFT and the supervised stages (every rank, on its share, with --dist.shard full), prints and
    writes the run's files."""
    from rich.console import Console

    from .dist.shared import gather_successes, merge_iteration
    from .envs.tabletop.expert import collect_demos
    from .policy.precision import resolve_bc_autocast
    from .rl.sft import demos_to_arrays, sft_train

    console = Console(quiet=not comm.main)
    if not comm.main:
        cfg.progress, cfg.tensorboard = False, False
    t_start = time.perf_counter()
    start_run(cfg)
    if cfg.env.benchmark != "tabletop" and not cfg.skip_sft:
        raise SystemExit(f"error: {cfg.env.benchmark} has no scripted expert to make SFT demonstrations: start RL from "
                         "a fine-tuned checkpoint with --skip-sft True --policy PATH (an OpenVLA fine-tuned on the "
                         "suite, or a vlarl-fast checkpoint)")
    out = prepare_output_dir(cfg.output_dir)
    tasks = resolve_tasks(cfg)
    check_heldout_episodes(cfg, tasks)
    cfg.ppo = dataclasses.replace(cfg.ppo, layouts=resolve_layouts(cfg, tasks))
    check_ready(tasks)
    check_algo(cfg)
    if cfg.policy.policy == "tiny" and cfg.ppo.lora_rank == 0 and cfg.ppo.train_layers > cfg.policy.num_layers:
        raise ConfigError(f"--ppo.train-layers {cfg.ppo.train_layers} exceeds the tiny VLA's "
                          f"--policy.num-layers {cfg.policy.num_layers}: lower it (0 trains every layer)")
    reward_model = load_reward_model(cfg)
    resumed = load_resume(cfg, comm)
    if comm.main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    instructions = [get_task(t).instruction for t in tasks]
    policy = make_policy(cfg.policy.policy, instructions=instructions, image_size=cfg.env.image_size, seed=cfg.seed,
                         device=cfg.device, hidden_size=cfg.policy.hidden_size, num_layers=cfg.policy.num_layers,
                         dtype=cfg.policy.dtype, attn_implementation=cfg.policy.attn_implementation,
                         action_convention=cfg.policy.action_convention)
    policy.decode_impl = cfg.policy.decode
    if resumed is not None:
        policy.norm_stats = resumed["norm_stats"]   # what SFT fitted: the supervised stages tokenise with it
    bc_dtype = resolve_bc_autocast(cfg.sft.bc_autocast, cfg.device)
    if cfg.policy.gradient_checkpointing:
        enable_gradient_checkpointing(policy.model)
    if cfg.skip_sft and policy.norm_stats is None and cfg.env.benchmark == "libero":
        # LIBERO's controller takes normalised deltas in [-1, 1]: a fresh policy acts in that space directly
        policy.norm_stats = NormStats.identity()
        console.print("note: the policy has no action statistics; it acts in LIBERO's normalised [-1, 1] space")
    logger = _Logger(out, cfg.tensorboard, purge_step=None if resumed is None else resumed_env_steps(resumed))
    summary: dict = {"tasks": tasks, "seed": cfg.seed, "world_size": comm.world,
                     "bc_dtype": str(bc_dtype or torch.float32).removeprefix("torch.")}
    past = {} if resumed is None else resumed["extra"]
    timings: dict[str, float] = dict(past.get("timings", {}))

    # ---- 1. SFT -----------------------------------------------------------------------------
    def expert_data():
        with _bar(len(tasks) * cfg.sft.demos_per_task, "demos", cfg.progress) as bar:
            episodes = collect_demos(tasks, cfg.sft.demos_per_task, noise=cfg.sft.demo_noise, seed=cfg.seed,
                                     image_size=cfg.env.image_size, progress=bar,
                                     clean_labels=cfg.sft.clean_labels, layouts=cfg.sft.demo_layouts)
        return episodes, demos_to_arrays(episodes)

    data = None
    if not cfg.skip_sft and resumed is None and comm.main:
        t0 = time.perf_counter()
        episodes, data = expert_data()
        steps = cfg.sft.epochs * math.ceil(len(data["actions"]) / cfg.sft.batch_size)
        with _bar(steps, "sft", cfg.progress) as bar:
            losses = sft_train(policy, data, epochs=cfg.sft.epochs, batch_size=cfg.sft.batch_size,
                               lr=cfg.sft.learning_rate, weight_decay=cfg.sft.weight_decay, seed=cfg.seed,
                               augment_pad=cfg.sft.augment_pad, warmup_steps=cfg.sft.warmup_steps,
                               progress=bar, autocast_dtype=bc_dtype, ema_decay=cfg.sft.ema_decay,
                               log=lambda e, l: logger.scalars("sft", {"loss": l}, e))
        timings["sft_s"] = time.perf_counter() - t0
        console.print(f"SFT: {len(episodes)} demos, {len(data['actions'])} steps, loss {losses[0]:.3f} -> "
                      f"{losses[-1]:.3f} ({timings['sft_s']:.0f} s)")
        save_policy(policy, out / "checkpoints" / "sft", extra={"stage": "sft"})
    if not cfg.skip_sft and resumed is None and comm.world > 1:
        # the other ranks wait here for rank 0's fine-tuned weights (--dist.timeout-min)
        comm.broadcast_module(policy.model)
        policy.norm_stats = comm.broadcast(policy.norm_stats)
    elif resumed is None and policy.norm_stats is None:
        raise SystemExit("error: --skip-sft needs a --policy.policy checkpoint that has action statistics "
                         "(dataset_statistics.json); the 'tiny' preset has none")
    if resumed is not None:
        sft_eval, heldout_sft = past["sft_eval"], past["heldout_sft"]
        console.print(f"resuming {out} at RL iteration {resumed['iteration']} ({resumed['global_step']} env steps)")
    else:
        sft_eval, heldout_sft = evaluate_start(policy, cfg, tasks, logger, timings, console, comm)
    heldout_rl = None

    rl_eval, env_steps, history = None, 0, list(past.get("history", []))
    if cfg.ppo.iterations > 0:
        # ---- 2. RL ------------------------------------------------------------------------------
        from .dist.fsdp import whole_state_dicts
        from .rl.trainer import PPOTrainer
        t0 = time.perf_counter()
        parts = build_rl(cfg, policy, tasks, data, expert_data, bc_dtype, resumed, console, comm)
        envs, curriculum, schedule, recorder, stage = (parts[k] for k in ("envs", "curriculum", "schedule",
                                                                          "recorder", "stage"))
        shaping = None
        if reward_model is not None:
            from .prm.shaping import PRMShaping
            shaping = PRMShaping(reward_model, cfg.reward.prm_coef, cfg.ppo.gamma, cfg.reward.prm_batch_size)
        grouped = schedule is not None
        budget = cfg.ppo.iterations * cfg.ppo.num_steps * cfg.env.num_envs   # env steps, the same for every algo
        trainer = None
        try:
            trainer = PPOTrainer(policy, envs, cfg.ppo, seed=cfg.seed, curriculum=curriculum, recorder=recorder,
                                 shaping=shaping, comm=comm, shard=cfg.dist.shard == "full")
            whole_weights = trainer.whole_weights
            if stage is not None:
                stage.root = trainer.root
            summary["update_from_layer"] = trainer.first_layer   # None: the update runs the whole model
            if trainer.first_layer is not None:
                console.print(f"PPO update: from the rollout's cached inputs of LM layer {trainer.first_layer} "
                              f"(--ppo.cache-frozen-layers {cfg.ppo.cache_frozen_layers})")
            if resumed is not None:
                from .rl import checkpointing
                checkpointing.restore(resumed, trainer, stage=stage, recorder=recorder, curriculum=curriculum,
                                      schedule=schedule)

            def checkpoint() -> Path:
                from .rl import checkpointing
                extra = {"history": history, "timings": timings, "sft_eval": sft_eval, "heldout_sft": heldout_sft,
                         "wall_time_s": past.get("wall_time_s", 0.0) + time.perf_counter() - t_start}
                state = checkpointing.capture(trainer, stage=stage, recorder=recorder, curriculum=curriculum,
                                              schedule=schedule, extra=extra)
                return checkpointing.save(out, state, cfg.checkpoint_keep, comm,
                                          checkpointing.sharded_parts(trainer, stage))

            with _bar(cfg.ppo.iterations, "ppo", cfg.progress) as bar, _StopRequest(console) as stop:
                bar.update(trainer.iteration)
                env_steps = comm.sum([trainer.global_step])[0]   # every rank's
                while trainer.iteration < cfg.ppo.iterations and env_steps < budget:
                    st = trainer.train_iteration()
                    if comm.world > 1 and curriculum is not None:
                        curriculum.sync()
                    row = merge_iteration(comm.all_gather(dataclasses.asdict(st)))
                    st = type(st)(**row)
                    env_steps = row["env_steps"]
                    history.append(row)
                    logger.scalars("ppo", row, st.env_steps)
                    if curriculum is not None:
                        logger.scalars("curriculum", curriculum.summary(), st.env_steps)
                    bar.update(1)
                    bar.set_postfix(success=f"{st.success:.2f}", kl=f"{st.approx_kl:.3f}")
                    if comm.main:
                        bar.write(iteration_line(st, shaping is not None, grouped, cfg.ppo.kl_coef > 0))
                    if recorder is not None and st.iteration % cfg.ire.every == 0:
                        t1 = time.perf_counter()
                        gather_successes(recorder, comm)   # the buffer is rank 0's
                        if trainer.root is None:   # and so is the stage, whose weights then go to every rank
                            res = stage.run(recorder.arrays()) if comm.main else None
                            trainer.share_stage_weights()
                        else:   # every rank steps its shards on its share of the rows
                            res = stage.run(comm.broadcast(recorder.arrays() if comm.main else None))
                        dt = time.perf_counter() - t1
                        timings["ire_s"] = timings.get("ire_s", 0.0) + dt
                        if comm.main:
                            logger.scalars("ire", {"loss": res["loss"], "online_steps": res["online_steps"],
                                                   "episodes_kept": recorder.kept}, st.env_steps)
                            bar.write(f"iRe-VLA supervised stage {stage.stages}: {res['steps']} steps on "
                                      f"{res['online_steps']} online steps ({len(recorder.episodes)} successful "
                                      f"episodes) + demonstrations | loss {res['loss']:.3f} | {dt:.0f} s")
                    done = trainer.iteration >= cfg.ppo.iterations or env_steps >= budget
                    if comm.any(stop.requested) and not done:
                        path = checkpoint()
                        if comm.main:
                            (out / "history.json").write_text(json.dumps(history, indent=2))
                        logger.close()
                        console.print(f"stopped after RL iteration {trainer.iteration}; checkpoint {path}\n"
                                      f"resume with: vlarl-fast train --resume {out}", soft_wrap=True)
                        comm.barrier()   # no rank leaves before rank 0 has written and printed
                        raise SystemExit(130)
                    if cfg.checkpoint_every and (trainer.iteration % cfg.checkpoint_every == 0 or done):
                        checkpoint()   # at the end too: --resume with more --ppo.iterations extends the run
        finally:
            envs.close()
            if trainer is not None:
                trainer.close()
        timings["rl_s"] = timings.get("rl_s", 0.0) + time.perf_counter() - t0
        if shaping is not None:
            timings["prm_s"] = shaping.seconds
            summary["prm_ms_per_step"] = 1000 * shaping.seconds / max(1, shaping.steps)
        with whole_state_dicts(trainer.root):
            if comm.main:
                final = save_policy(policy, out / "checkpoints" / "final", extra={"stage": "rl",
                                                                                   "iterations": trainer.iteration})
                if curriculum is not None:
                    curriculum.save(final)
                (out / "history.json").write_text(json.dumps(history, indent=2))

        # ---- 3. evaluation ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        with whole_weights():
            rl_eval = run_eval(policy, cfg, tasks, "after RL", comm=comm)
        timings["eval_rl_s"] = time.perf_counter() - t0
        env_steps = int(env_steps)
        logger.scalars("eval", {"success": rl_eval["success"]}, env_steps)
        evals = ([(0, sft_eval["success"], "eval before RL")] if sft_eval else []) + \
            [(env_steps, rl_eval["success"], "eval after RL")]
        if heldout_sft is not None:
            t0 = time.perf_counter()
            with whole_weights():
                heldout_rl = run_eval(policy, cfg, tasks, "after RL", "heldout", comm)
            timings["eval_heldout_rl_s"] = time.perf_counter() - t0
            logger.scalars("eval_heldout", {"success": heldout_rl["success"]}, env_steps)
            evals += [(0, heldout_sft["success"], "held-out eval before RL"),
                      (env_steps, heldout_rl["success"], "held-out eval after RL")]
        if comm.main:
            plot_success(history, evals, out / "success.png")
    if rl_eval is None and comm.main:
        save_policy(policy, out / "checkpoints" / "final", extra={"stage": "sft"})
    console.print(success_table(sft_eval, rl_eval, heldout=(heldout_sft, heldout_rl),
                                title="Success per task: fixed initial states and held-out layouts"
                                if heldout_sft is not None else "Success per task"))
    wall = past.get("wall_time_s", 0.0) + time.perf_counter() - t_start
    summary.update({
        "sft_success": None if sft_eval is None else sft_eval["success"],
        "rl_success": None if rl_eval is None else rl_eval["success"],
        "eval_episodes": (rl_eval or sft_eval or {}).get("episodes", 0),
        "env_steps": env_steps,
        "wall_time_s": wall,
        "sft_per_task": None if sft_eval is None else sft_eval["per_task"],
        "rl_per_task": None if rl_eval is None else rl_eval["per_task"],
        "timings_s": timings,
        # null when the held-out evaluation was not run (--eval.heldout-episodes 0, or no RL for the RL one)
        "heldout_sft_success": None if heldout_sft is None else heldout_sft["success"],
        "heldout_rl_success": None if heldout_rl is None else heldout_rl["success"],
        "heldout_episodes": None if heldout_sft is None else heldout_sft["episodes"],
        "heldout_sft_per_task": None if heldout_sft is None else heldout_sft["per_task"],
        "heldout_rl_per_task": None if heldout_rl is None else heldout_rl["per_task"],
        "rl_layouts": cfg.ppo.layouts,
        "algo": cfg.ppo.algo,
        "updates": len(history),
        "resumed": cfg.resume is not None,
        "skipped_updates": sum(h["skipped_updates"] for h in history),
        "eval_greedy": cfg.eval.greedy,
        "reward": cfg.env.reward,
        "prm": cfg.reward.prm,
        "prm_coef": None if cfg.reward.prm is None else cfg.reward.prm_coef,
        # the reward model's share of the whole run's time
        "prm_share": None if "prm_s" not in timings else timings["prm_s"] / wall,
    })
    if comm.main:
        write_json_atomic(out / "summary.json", summary)
    logger.close()
    console.print(f"wrote {out / 'summary.json'}{', ' + str(out / 'success.png') if history else ''}, "
                  f"checkpoints in {out / 'checkpoints'} ({summary['wall_time_s']:.0f} s)")
    return summary
