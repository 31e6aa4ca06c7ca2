"""Bad configuration fails at the start, in one line naming the flag (exit code 2), before any work."""
import dataclasses
import json
from typing import get_type_hints

import pytest

from vlarl_fast.cli import EvalCommand
from vlarl_fast.config import TrainConfig
from vlarl_fast.prm.config import PRMConfig
from vlarl_fast.validate import RULES, ConfigError, check_config, numeric


def _numeric_fields(cls, where=""):
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _numeric_fields(hint, where + f.name + ".")
        elif numeric(hint):
            yield cls.__name__, f.name, where + f.name


@pytest.mark.parametrize("cls", [TrainConfig, PRMConfig, EvalCommand])
def test_every_numeric_field_has_a_range(cls):
    missing = [path for owner, name, path in _numeric_fields(cls) if name not in RULES.get(owner, {})]
    assert not missing, f"add range rules to vlarl_fast/validate.py for {missing}"


def test_defaults_and_presets_pass():
    from vlarl_fast.config import PRESETS, apply_presets
    from vlarl_fast.prm.config import PRM_PRESETS
    for name in PRESETS:
        check_config(apply_presets(TrainConfig(), name, None))
    for name in PRM_PRESETS:
        check_config(apply_presets(PRMConfig(), name, None, PRM_PRESETS))
    check_config(EvalCommand(policy="tiny"))


BAD_TRAIN = [
    (["--env.num-envs", "-3"], r"--env\.num-envs must be an integer >= 0; got -3"),
    (["--ppo.learning-rate", "nan"], r"--ppo\.learning-rate must be a finite number > 0; got nan"),
    (["--ppo.learning-rate", "0"], r"--ppo\.learning-rate must be a finite number > 0"),
    (["--ppo.gamma", "1.5"], r"--ppo\.gamma must be a probability in \[0, 1\]"),
    (["--ppo.clip-low", "1"], r"--ppo\.clip-low must be a number in \(0, 1\)"),
    (["--ppo.num-steps", "0"], r"--ppo\.num-steps must be an integer >= 1"),
    (["--ppo.target-kl", "-1"], r"--ppo\.target-kl must be a finite number > 0"),
    (["--ppo.curriculum-fresh", "2"], r"--ppo\.curriculum-fresh must be a probability"),
    (["--ppo.max-grad-norm", "inf"], r"--ppo\.max-grad-norm must be a finite number > 0"),
    (["--sft.epochs", "0"], r"--sft\.epochs must be an integer >= 1"),
    (["--sft.demo-noise", "-0.1"], r"--sft\.demo-noise must be a finite number >= 0"),
    (["--ire.online-fraction", "1.2"], r"--ire\.online-fraction must be a probability"),
    (["--eval.episodes-per-state", "0"], r"--eval\.episodes-per-state must be an integer >= 1"),
    (["--policy.hidden-size", "0"], r"--policy\.hidden-size must be an integer >= 1"),
    (["--reward.prm-coef", "-1"], r"--reward\.prm-coef must be a finite number >= 0"),
    (["--threads", "-1"], r"--threads must be an integer >= 0"),
    (["--ppo.train-layers", "3"], r"--ppo\.train-layers 3 exceeds the tiny VLA's --policy\.num-layers 2"),
]


@pytest.mark.parametrize("argv,pattern", BAD_TRAIN, ids=[a[0] for a, _ in BAD_TRAIN])
def test_bad_train_values_fail_before_any_work(tmp_path, usage_error, argv, pattern):
    out = tmp_path / "run"
    usage_error(pattern, ["train", "--output-dir", str(out), "--progress", "False", *argv])
    assert not (out / "config.json").exists()   # nothing ran: not even the config was written


@pytest.mark.parametrize("argv,pattern", [
    (["prm", "--data.val-fraction", "1"], r"--data\.val-fraction must be a number in \[0, 1\)"),
    (["prm", "--segment.velocity-threshold", "-1"], r"--segment\.velocity-threshold must be a probability"),
    (["prm", "--data.expert-noise", "0.1", "-1"], r"--data\.expert-noise must be a finite number >= 0"),
    (["prm", "--train.learning-rate", "nan"], r"--train\.learning-rate must be a finite number > 0"),
    (["eval", "--policy", "tiny", "--num-tasks", "-1"], r"--num-tasks must be an integer >= 0"),
    (["eval", "--policy", "tiny", "--temperature", "0"], r"--temperature must be a finite number > 0"),
    (["eval", "--policy", "tiny", "--episodes-per-task", "0"], r"--episodes-per-task must be an integer >= 1"),
])
def test_bad_prm_and_eval_values(tmp_path, usage_error, argv, pattern):
    usage_error(pattern, [*argv, "--output-dir", str(tmp_path / "out"), "--progress", "False"])


def test_config_file_values_are_type_checked(tmp_path, usage_error):
    for overrides, pattern in [({"ppo": {"iterations": "ten"}}, r"--ppo\.iterations must be an integer; got 'ten'"),
                               ({"ppo": {"layouts": "everywhere"}}, r"--ppo\.layouts must be one of auto, fixed, open"),
                               ({"sft": {"clean_labels": "yes"}}, r"--sft\.clean-labels must be True or False"),
                               ({"env": {"tasks": [3]}}, r"--env\.tasks must be a string; got 3")]:
        f = tmp_path / "c.json"
        f.write_text(json.dumps(overrides))
        usage_error(pattern, ["train", "--config", str(f), "--output-dir", str(tmp_path / "run")])


def test_check_config_raises_a_value_error_for_library_callers():
    cfg = TrainConfig()
    cfg.ppo.lam = -0.5
    with pytest.raises(ConfigError, match=r"--ppo\.lam must be a probability") as e:
        check_config(cfg)
    assert isinstance(e.value, ValueError)


def test_eval_on_libero_without_assets_is_one_line(tmp_path, monkeypatch, usage_error):
    pytest.importorskip("libero")
    monkeypatch.setenv("VLARL_LIBERO_ASSETS", str(tmp_path))   # an empty folder: no assets in it
    usage_error("holds no LIBERO assets", ["eval", "--policy", "tiny", "--env", "libero", "--num-tasks", "1",
                                           "--output-dir", str(tmp_path / "out"), "--progress", "False"])
