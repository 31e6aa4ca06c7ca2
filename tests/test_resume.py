"""Exact resume: a run stopped (Ctrl-C) or cut short and resumed ends with the very weights and history of one
that ran through."""
import json
import signal

import pytest

from vlarl_fast.cli import main

FAST = ["--preset", "smoke", "--progress", "False", "--eval.heldout-episodes", "0", "--eval.init-states", "1",
        "--tensorboard", "False"]
WALL_CLOCK = ("sps", "prm_seconds", "rollout_seconds", "update_seconds")


def _same_run(a, b):
    assert (a / "checkpoints/final/model.safetensors").read_bytes() == \
        (b / "checkpoints/final/model.safetensors").read_bytes()
    strip = [[{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in json.loads((d / "history.json")
                                                                                        .read_text())] for d in (a, b)]
    assert strip[0] == strip[1] and len(strip[0]) > 0
    assert (a / "checkpoints/final/curriculum.json").read_text() == (b / "checkpoints/final/curriculum.json").read_text()


def test_ctrl_c_leaves_a_checkpoint_that_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", *FAST, "--ppo.iterations", "3", "--output-dir", str(ref)]) == 0
    from vlarl_fast.rl.trainer import PPOTrainer
    original = PPOTrainer.train_iteration

    def interrupted(self):
        st = original(self)
        if self.iteration == 2:
            signal.raise_signal(signal.SIGINT)   # Ctrl-C during the second iteration's update
        return st

    monkeypatch.setattr(PPOTrainer, "train_iteration", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["train", *FAST, "--ppo.iterations", "3", "--output-dir", str(run), "--checkpoint-every", "0"])
    assert e.value.code == 130
    out = capsys.readouterr().out
    assert f"resume with: vlarl-fast train --resume {run}" in out
    assert (run / "checkpoints" / "rl-00002" / "state.pt").is_file() and not (run / "summary.json").exists()
    monkeypatch.setattr(PPOTrainer, "train_iteration", original)
    assert main(["train", "--resume", str(run), "--progress", "False"]) == 0
    _same_run(ref, run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] and summary["updates"] == 3


def test_a_finished_group_run_extends_to_the_run_it_would_have_been(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    grpo = ["--ppo.algo", "grpo", "--ppo.filter-groups", "False", "--ppo.num-steps", "8"]
    assert main(["train", *FAST, *grpo, "--ppo.iterations", "2", "--output-dir", str(ref)]) == 0
    assert main(["train", *FAST, *grpo, "--ppo.iterations", "1", "--checkpoint-every", "1",
                 "--output-dir", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--ppo.iterations", "2", "--progress", "False"]) == 0
    _same_run(ref, run)


def test_resume_refuses_what_would_change_the_past(tmp_path, usage_error):
    usage_error("no config.json there", ["train", "--resume", str(tmp_path)])
    run = tmp_path / "run"
    assert main(["train", *FAST, "--ppo.iterations", "1", "--ppo.num-steps", "2", "--output-dir", str(run),
                 "--ire.every", "0"]) == 0
    usage_error(r"--ppo\.learning-rate would change the run already made",
                ["train", "--resume", str(run), "--ppo.learning-rate", "0.001"])
    (run / "checkpoints" / "rl-00001").rename(run / "checkpoints" / "elsewhere")
    usage_error("no RL checkpoint in", ["train", "--resume", str(run), "--ppo.iterations", "2"])


def test_help_documents_resume_and_checkpoints(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "--checkpoint-every" in text and "--ppo.algo" in text
