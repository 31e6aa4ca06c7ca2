"""Range and type checks of every configuration field, run before any work starts.

A bad value must fail in one line that names the flag, not minutes into a run or as a traceback from deep
inside the update. Each numeric field of every command's configuration has a rule here;
``tests/test_validate.py`` fails when a new numeric field arrives without one.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value out of its range or of the wrong type (the CLI prints it in one line, exit 2)."""


# rule -> (test, what the value must be)
CHECKS: dict[str, tuple[typing.Callable[[float], bool], str]] = {
    "count": (lambda v: v >= 1, "an integer >= 1"),
    "count0": (lambda v: v >= 0, "an integer >= 0"),
    "positive": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "nonneg": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "finite": (lambda v: math.isfinite(v), "a finite number"),
    "prob": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "below1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}

# config class name -> field -> rule (None values pass: they mean "the default" where a field allows None)
RULES: dict[str, dict[str, str]] = {
    "EnvConfig": {"image_size": "count", "num_envs": "count0", "max_episode_steps": "count"},
    "PolicyConfig": {"hidden_size": "count", "num_layers": "count"},
    "SFTConfig": {"demos_per_task": "count", "demo_layouts": "count", "demo_noise": "nonneg", "epochs": "count",
                  "augment_pad": "count0", "ema_decay": "below1", "batch_size": "count", "learning_rate": "positive",
                  "warmup_steps": "count0", "weight_decay": "nonneg"},
    "PPOConfig": {"iterations": "count0", "num_steps": "count", "learning_rate": "positive",
                  "critic_learning_rate": "positive", "gamma": "prob", "lam": "prob", "clip_low": "fraction",
                  "clip_high": "positive", "vf_coef": "nonneg", "ent_coef": "nonneg", "update_epochs": "count",
                  "minibatch_size": "count", "max_grad_norm": "positive", "target_kl": "positive",
                  "critic_warmup": "count0", "temperature": "positive", "train_layers": "count0",
                  "lora_rank": "count0", "lora_alpha": "positive", "lora_dropout": "below1",
                  "curriculum_fresh": "prob", "curriculum_pool": "count", "curriculum_temperature": "positive",
                  "curriculum_window": "count", "curriculum_floor": "prob", "kl_coef": "nonneg",
                  "group_size": "count"},
    "IReConfig": {"every": "count0", "steps": "count0", "batch_size": "count", "learning_rate": "positive",
                  "online_fraction": "prob", "capacity": "count"},
    "DistConfig": {"nproc": "count", "gpus_per_worker": "nonneg", "cpus_per_worker": "positive",
                   "timeout_min": "positive"},
    "RewardConfig": {"prm_coef": "nonneg", "prm_batch_size": "count"},
    "EvalConfig": {"episodes_per_state": "count", "init_states": "count0", "heldout_episodes": "count0"},
    "TrainConfig": {"seed": "count0", "threads": "count0", "checkpoint_every": "count0", "checkpoint_keep": "count"},
    "EvalCommand": {"num_tasks": "count0", "episodes_per_task": "count", "episodes_per_state": "count",
                    "init_states": "count0", "temperature": "positive", "num_envs": "count0",
                    "max_episode_steps": "count", "videos": "count0", "seed": "count0"},
    "PRMConfig": {"seed": "count0", "threads": "count0", "plots": "count0"},
    "PRMDataConfig": {"expert_episodes": "count0", "expert_noise": "nonneg", "layouts": "count",
                      "policy_episodes": "count0", "temperature": "positive", "val_fraction": "below1"},
    "PRMModelConfig": {"hidden_size": "count", "num_layers": "count", "lora_rank": "count0"},
    "PRMTrainConfig": {"epochs": "count", "batch_size": "count", "learning_rate": "positive",
                       "weight_decay": "nonneg"},
    "SegmentConfig": {"gripper_threshold": "finite", "velocity_threshold": "prob", "min_gap": "count0"},
    "LabelConfig": {"window": "count0", "final_frames": "count0"},
}


def flag(path: str) -> str:
    return "--" + path.replace("_", "-")


def _type_error(path: str, value: Any, hint) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (None when it does). Config files bypass tyro's parsing,
    so a YAML string where a number belongs must be caught here."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = [_type_error(path, value, a) for a in args]
        return None if any(e is None for e in errors) else next(e for e in errors if e is not None)
    if hint is type(None):
        return None if value is None else f"{flag(path)} must be empty; got {value!r}"
    if origin is Literal:
        return None if value in args else f"{flag(path)} must be one of {', '.join(map(str, args))}; got {value!r}"
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return f"{flag(path)} must be a list; got {value!r}"
        inner = args[0] if args else Any
        return next((e for e in (_type_error(path, v, inner) for v in value) if e is not None), None)
    if hint is bool:
        return None if isinstance(value, bool) else f"{flag(path)} must be True or False; got {value!r}"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else \
            f"{flag(path)} must be an integer; got {value!r}"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else \
            f"{flag(path)} must be a number; got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"{flag(path)} must be a string; got {value!r}"
    return None


def numeric(hint) -> bool:
    """Whether a field's annotation holds numbers (and so needs a range rule)."""
    if hint in (int, float):
        return True
    return any(numeric(a) for a in get_args(hint))


def check_config(cfg, where: str = "") -> None:
    """Raise ConfigError on the first field of ``cfg`` (a config dataclass, nested ones included) whose value has
    the wrong type or lies outside its range."""
    hints = get_type_hints(type(cfg))
    rules = RULES.get(type(cfg).__name__, {})
    for f in dataclasses.fields(cfg):
        value, path = getattr(cfg, f.name), where + f.name
        if dataclasses.is_dataclass(value):
            check_config(value, path + ".")
            continue
        why = _type_error(path, value, hints[f.name])
        if why is not None:
            raise ConfigError(why)
        rule = rules.get(f.name)
        if rule is None or value is None:
            continue
        test, what = CHECKS[rule]
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if not test(v):
                raise ConfigError(f"{flag(path)} must be {what}; got {value!r}")
