"""The `vlarl-fast` command: train, sft, eval, info."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from .config import EnvConfig, EvalConfig, TrainConfig, apply_presets

USAGE = """usage: vlarl-fast {train,sft,eval,info} [options]

  train   SFT on scripted demos -> PPO -> evaluation (no arguments: the built-in CPU default)
  sft     supervised fine-tuning only (demos -> checkpoint -> evaluation)
  eval    evaluate a policy over every task and initial state
  info    versions, accelerators, render backend, compiled extension and Triton status

`vlarl-fast COMMAND --help` lists every option of a command."""


@dataclass
class EvalCommand:
    """Evaluate a policy (checkpoint directory) over every task and initial state."""

    policy: str
    """Checkpoint directory (as written by `vlarl-fast train` or `sft`), or the preset 'tiny' (random weights)."""
    output_dir: str = "runs/eval"
    """Where results.json goes."""
    seed: int = 0
    """Seed of the evaluation (sampling and env RNGs)."""
    device: str = "cpu"
    """Torch device."""
    temperature: float = 1.0
    """Sampling temperature (ignored with --eval.greedy)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    progress: bool = True
    """Show a progress bar."""


def _base_train_config(args: list[str]) -> TrainConfig:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(args)
    try:
        return apply_presets(TrainConfig(), known.preset, known.config)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def _parse(cls, args, prog, default=None):
    import tyro
    return tyro.cli(cls, args=args, prog=prog, default=default, config=(tyro.conf.FlagConversionOff,))


def cmd_train(args: list[str], prog="vlarl-fast train", sft_only: bool = False) -> int:
    from .train import train
    base = _base_train_config(args)
    if sft_only:
        base.ppo.iterations = 0
    cfg = _parse(TrainConfig, args, prog, default=base)
    if sft_only:
        cfg.ppo.iterations = 0
    train(cfg)
    return 0


def cmd_eval(args: list[str]) -> int:
    from rich.console import Console

    from .envs import get_task, list_tasks
    from .policy import make_policy
    from .report import success_table, write_json_atomic
    from .train import _bar, prepare_output_dir
    from .rl.evaluate import count_episodes, evaluate

    cfg = _parse(EvalCommand, args, "vlarl-fast eval")
    out = prepare_output_dir(cfg.output_dir)
    tasks = list(cfg.env.tasks) or list_tasks(cfg.env.suite)
    policy = make_policy(cfg.policy, instructions=[get_task(t).instruction for t in tasks],
                         image_size=cfg.env.image_size, seed=cfg.seed, device=cfg.device)
    n = count_episodes(tasks, cfg.eval.init_states, cfg.eval.episodes_per_state)
    with _bar(n, "eval", cfg.progress) as bar:
        res = evaluate(policy, tasks, init_states=cfg.eval.init_states, episodes_per_state=cfg.eval.episodes_per_state,
                       num_envs=cfg.env.num_envs, image_size=policy.config.image_size, seed=cfg.seed,
                       greedy=cfg.eval.greedy, temperature=cfg.temperature, progress=bar)
    Console().print(success_table(None, res, title=f"Success per task ({cfg.policy})"))
    write_json_atomic(out / "results.json", res | {"policy": cfg.policy, "greedy": cfg.eval.greedy})
    return 0


def cmd_info(args: list[str]) -> int:
    if args and args[0] in ("-h", "--help"):
        print("usage: vlarl-fast info\n\nPrint versions, accelerators, render backend, and whether the compiled "
              "extension and Triton are usable.")
        return 0
    from .info import collect_info, format_info
    print(format_info(collect_info()))
    return 0


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
                "eval": cmd_eval, "info": cmd_info}
    if cmd not in handlers:
        print(f"error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from .envs import RenderBackendError, UnknownTaskError
    from .policy import CheckpointError
    try:
        return handlers[cmd](rest)
    except (UnknownTaskError, CheckpointError, RenderBackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
