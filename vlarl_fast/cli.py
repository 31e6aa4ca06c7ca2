"""The `vlarl-fast` command: train, sft, eval, prm, info."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Literal

from .config import PRESETS, TrainConfig, apply_presets
from .validate import ConfigError, check_config, flag

USAGE = """usage: vlarl-fast {train,sft,eval,prm,info} [options]

  train   SFT on scripted demos -> PPO + iRe-VLA stages -> evaluation (no arguments: the built-in CPU
          default; --env libero --suite S --policy PATH: RL on LIBERO from a checkpoint)
  sft     supervised fine-tuning only (demos -> checkpoint -> evaluation)
  eval    evaluate a policy over the tasks and initial states of a suite (--env libero for LIBERO)
  prm     train a robotic process reward model on segmented, pseudo-labelled trajectories (then
          `vlarl-fast train --reward.prm DIR` uses it)
  info    versions, accelerators, render backend, compiled extension and Triton status

`vlarl-fast COMMAND --help` lists every option of a command."""


@dataclass
class EvalCommand:
    """Evaluate a policy over the tasks and initial states of a suite: success table, results.json, a bar
    chart (success.png) and optional videos."""

    policy: str
    """Checkpoint directory (vlarl-fast's or OpenVLA's), or the preset 'tiny' (random weights)."""
    env: Literal["tabletop", "libero"] = "tabletop"
    """Benchmark: the built-in tabletop suite, or LIBERO (the libero extra and VLARL_LIBERO_ASSETS)."""
    suite: str | None = None
    """Suite of the benchmark (tabletop: 'tabletop'; LIBERO: libero_spatial (default), libero_object,
    libero_goal, libero_10, libero_90)."""
    tasks: tuple[str, ...] = ()
    """Task ids to evaluate (e.g. libero_spatial/3); empty: the suite's tasks."""
    num_tasks: int = 0
    """Evaluate only the first N tasks of the suite (0: all)."""
    episodes_per_task: int | None = None
    """Episodes per task, dealt over its initial states in order (LIBERO's protocol: 50, one per state).
    Unset: --episodes-per-state episodes on each initial state."""
    episodes_per_state: int | None = None
    """Episodes per (task, initial state) when --episodes-per-task is unset (default: tabletop 5, LIBERO and the
    held-out split 1)."""
    init_states: int = 0
    """Use only the first K initial states (layouts of --split) of each task (0: all)."""
    split: Literal["fixed", "open", "heldout"] = "fixed"
    """Layouts to evaluate on: the fixed initial states; 'heldout', the tabletop's 100 held-out layouts per task that
    no training run uses; 'open', the first --init-states layouts of the tabletop's open training stream (what RL
    with --ppo.layouts open practises on)."""
    greedy: bool = False
    """Greedy decoding; by default actions are sampled at --temperature."""
    temperature: float = 1.0
    """Sampling temperature."""
    num_envs: int = 0
    """Environments stepped together (0: tabletop 96, LIBERO 8)."""
    max_episode_steps: int | None = None
    """Cut episodes shorter than the suite's limit (quick checks; not a benchmark number)."""
    render_device: str = "auto"
    """Where the env worker processes render: 'auto' (the visible GPUs, through each GPU's own EGL device), 'cpu'
    (Mesa), 'cuda' (every visible GPU) or 'cuda:0,cuda:2' (those CUDA devices)."""
    videos: int = 0
    """Record the first N episodes of each task as videos in OUTPUT_DIR/videos (the policy's view)."""
    video_format: Literal["gif", "mp4"] = "gif"
    """Video container: gif (Pillow) or mp4 (needs imageio-ffmpeg)."""
    output_dir: str = "runs/eval"
    """Where results.json, success.png and videos/ go."""
    seed: int = 0
    """Seed of the evaluation (sampling and env RNGs)."""
    device: str = "cpu"
    """Torch device."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype of an OpenVLA or transformers checkpoint ('auto': bfloat16 on CUDA, float32 on the CPU)."""
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """Attention kernel ('auto': flash_attention_2 on CUDA in 16-bit when flash-attn is installed, else sdpa)."""
    decode: Literal["fast", "compiled"] = "fast"
    """Action decoding: 'fast' (the prefill and 6 cached steps, eager) or 'compiled' (the same through
    torch.compile: faster per call, but each new batch size or prompt length first compiles for seconds to a
    minute, so it pays off for long runs and large models)."""
    action_convention: Literal["auto", "identity", "libero-openvla"] = "auto"
    """How decoded actions become env actions ('auto': what the checkpoint recorded, else 'libero-openvla' for an
    OpenVLA checkpoint whose statistics key starts with 'libero' (gripper 0 = close flipped to LIBERO's +1), else
    'identity')."""
    progress: bool = True
    """Show a progress bar."""


EPISODES_PER_STATE = {"tabletop": 5, "libero": 1}


def _base_config(cls, args: list[str], presets: dict):
    """Defaults <- --preset <- --config, before tyro applies the rest of the command line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(args)
    try:
        base = apply_presets(cls(), known.preset, known.config, presets)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    check_config(base)   # a config file's values, before tyro takes them as defaults
    return base


def _parse(cls, args, prog, default=None):
    import tyro
    return tyro.cli(cls, args=args, prog=prog, default=default, config=(tyro.conf.FlagConversionOff,))


# short spellings of the most used train options (`vlarl-fast train --env libero --suite S --policy PATH`)
TRAIN_ALIASES = {"--env": "--env.benchmark", "--suite": "--env.suite", "--policy": "--policy.policy"}
PRM_ALIASES = {"--env": "--env.benchmark", "--suite": "--env.suite", "--policy": "--data.policy"}


def expand_aliases(args: list[str], aliases: dict = TRAIN_ALIASES) -> list[str]:
    out = []
    for a in args:
        name, eq, value = a.partition("=")
        if name in aliases:
            a = aliases[name] + eq + value
        out.append(a)
    return out


def cmd_prm(args: list[str]) -> int:
    from .prm.config import PRM_PRESETS, PRMConfig
    from .prm.run import run_prm
    args = expand_aliases(args, PRM_ALIASES)
    base = _base_config(PRMConfig, args, PRM_PRESETS)
    run_prm(_parse(PRMConfig, args, "vlarl-fast prm", default=base))
    return 0


# what --resume may change: nothing that alters the iterations already run
RESUMABLE = ("ppo.iterations", "checkpoint_every", "checkpoint_keep", "progress", "tensorboard", "resume",
             "output_dir")


def _flat(d: dict, where: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, where + k + ".") if isinstance(v, dict) else {where + k: v})
    return out


def resume_config(args: list[str], prog: str) -> TrainConfig:
    """`train --resume RUN_DIR`: RUN_DIR's config.json, then the command line, which may change only RESUMABLE."""
    import dataclasses
    import json
    from pathlib import Path

    from .config import _merge
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--resume")
    run_dir = pre.parse_known_args(args)[0].resume
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json there; name the output directory of a train run")
    saved = json.loads(path.read_text())
    base = _merge(TrainConfig(), saved)
    base.output_dir = base.resume = run_dir
    cfg = _parse(TrainConfig, args, prog, default=base)
    now = _flat(json.loads(json.dumps(dataclasses.asdict(cfg))))
    changed = sorted(k for k, v in _flat(saved).items() if now.get(k) != v and k not in RESUMABLE)
    if changed:
        raise ConfigError(f"--resume {run_dir}: {', '.join(map(flag, changed))} would change the run already "
                          f"made; a resumed run may change only {', '.join(map(flag, RESUMABLE[:-2]))}")
    return cfg


def cmd_train(args: list[str], prog="vlarl-fast train", sft_only: bool = False) -> int:
    from .dist.launch import launch
    args = expand_aliases(args)
    if any(a == "--resume" or a.startswith("--resume=") for a in args):
        if sft_only:
            raise ConfigError("--resume continues an RL run: use `vlarl-fast train --resume RUN_DIR`")
        return launch(resume_config(args, prog))
    base = _base_config(TrainConfig, args, PRESETS)
    if sft_only:
        base.ppo.iterations = 0
    cfg = _parse(TrainConfig, args, prog, default=base)
    if sft_only:
        cfg.ppo.iterations = 0
    return launch(cfg)


def eval_env(cfg: EvalCommand):
    """The resolved environment settings and task list of an evaluation."""
    from .config import EnvConfig, resolve_env
    from .envs import get_task, list_tasks
    try:
        env = resolve_env(EnvConfig(benchmark=cfg.env, suite=cfg.suite, tasks=cfg.tasks, num_envs=cfg.num_envs,
                                    max_episode_steps=cfg.max_episode_steps, render_device=cfg.render_device))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    tasks = list(env.tasks) or list_tasks(env.suite)
    if cfg.num_tasks:
        tasks = tasks[:cfg.num_tasks]
    for t in tasks:
        get_task(t)   # unknown ids fail here, with suggestions
    return env, tasks


def cmd_eval(args: list[str]) -> int:
    from rich.console import Console

    from .config import env_options
    from .envs import check_ready, get_task
    from .policy import make_policy
    from .report import plot_task_success, success_table, write_json_atomic, write_videos
    from .rl.evaluate import count_episodes, evaluate
    from .train import _bar, prepare_output_dir

    cfg = _parse(EvalCommand, args, "vlarl-fast eval")
    check_config(cfg)
    out = prepare_output_dir(cfg.output_dir)
    env, tasks = eval_env(cfg)
    # the held-out and open splits have many layouts: one episode on each is their protocol
    per_state = cfg.episodes_per_state or (1 if cfg.split != "fixed" else EPISODES_PER_STATE[cfg.env])
    try:
        n = count_episodes(tasks, cfg.init_states, per_state, cfg.episodes_per_task, split=cfg.split)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    check_ready(tasks)
    policy = make_policy(cfg.policy, instructions=[get_task(t).instruction for t in tasks],
                         image_size=env.image_size, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                         attn_implementation=cfg.attn_implementation, action_convention=cfg.action_convention)
    policy.decode_impl = cfg.decode
    with _bar(n, "eval", cfg.progress) as bar:
        res = evaluate(policy, tasks, init_states=cfg.init_states, episodes_per_state=per_state,
                       episodes_per_task=cfg.episodes_per_task, num_envs=env.num_envs,
                       image_size=policy.config.image_size, seed=cfg.seed, greedy=cfg.greedy,
                       temperature=cfg.temperature, progress=bar, env_options=env_options(env), record=cfg.videos,
                       backend=env.backend, render_device=env.render_device, split=cfg.split)
    console = Console()
    console.print(success_table(None, res, title=f"Success per task ({cfg.policy}, {cfg.split} layouts)"))
    videos = res.pop("videos", {})
    files = write_videos(videos, out / "videos", cfg.video_format) if cfg.videos else []
    meta = {"policy": cfg.policy, "env": cfg.env, "suite": env.suite, "greedy": cfg.greedy,
            "temperature": cfg.temperature, "seed": cfg.seed, "max_episode_steps": cfg.max_episode_steps,
            "videos": [str(f.relative_to(out)) for f in files]}
    write_json_atomic(out / "results.json", res | meta)
    where = meta["suite"] + {"fixed": "", "heldout": " (held-out layouts)", "open": " (open-stream layouts)"}[cfg.split]
    plot_task_success(res, out / "success.png", title=f"{cfg.policy} on {where}")
    console.print(f"wrote {out / 'results.json'}, {out / 'success.png'}"
                  f"{f' and {len(files)} videos in ' + str(out / 'videos') if files else ''}")
    return 0


def cmd_info(args: list[str]) -> int:
    if args and args[0] in ("-h", "--help"):
        print("usage: vlarl-fast info\n\nPrint versions, accelerators, render backend, and whether the compiled "
              "extension and Triton are usable.")
        return 0
    from .info import collect_info, format_info
    print(format_info(collect_info()))
    return 0


def package_errors() -> tuple[type[Exception], ...]:
    """The package's own errors: each says what to fix, so the CLI prints it in one line (exit code 2)."""
    from .envs import RenderBackendError, UnknownTaskError
    from .envs.libero.bootstrap import LiberoAssetsError, LiberoNotInstalledError
    from .policy import CheckpointError
    from .policy.precision import PrecisionError
    return (UnknownTaskError, CheckpointError, RenderBackendError, LiberoNotInstalledError, LiberoAssetsError,
            PrecisionError, ConfigError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "--version":
        from . import __version__
        print(__version__)
        return 0
    handlers = {"train": lambda a: cmd_train(a), "sft": lambda a: cmd_train(a, "vlarl-fast sft", sft_only=True),
                "eval": cmd_eval, "prm": cmd_prm, "info": cmd_info}
    if cmd not in handlers:
        print(f"error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return handlers[cmd](rest)
    except package_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise   # tyro's own usage errors and --help carry their exit code
        # the package's own checks exit with their one-line message: a usage error, exit code 2
        print(e.code if e.code.startswith("error:") else f"error: {e.code}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
