"""The real entry point, end to end at tiny sizes, and its error messages."""
import json
import os

import pytest

from vlarl_fast.cli import main
from vlarl_fast.policy import load_policy


def test_help_lists_options(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--ppo.clip-high", "--ppo.critic-warmup", "--env.reward", "--preset", "--config", "--output-dir"):
        assert opt in out


def test_separate_critic_trains_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--output-dir", str(out), "--progress", "False",
                 "--ppo.critic", "separate", "--ppo.value-pooling", "mean"]) == 0
    final = out / "checkpoints" / "final"
    assert json.loads((final / "critic.json").read_text())["critic"] == "separate"
    pol = load_policy(final)
    assert (pol.critic_kind, pol.value_pooling) == ("separate", "mean") and pol.critic is not None
    assert main(["train", "--preset", "smoke", "--output-dir", str(tmp_path / "again"), "--progress", "False",
                 "--skip-sft", "True", "--policy.policy", str(final), "--ppo.critic", "separate",
                 "--ppo.value-pooling", "mean", "--ppo.iterations", "1"]) == 0


def test_unknown_command(capsys):
    assert main(["fly"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_smoke_train_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--output-dir", str(out), "--progress", "False"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("sft_success", "rl_success", "eval_episodes", "env_steps", "wall_time_s"):
        assert key in summary
    assert summary["eval_episodes"] == 2 and summary["env_steps"] == 2 * 4 * 4
    # every run evaluates on held-out layouts too (the smoke preset on 2 per task)
    assert summary["heldout_episodes"] == 2 and 0.0 <= summary["heldout_rl_success"] <= 1.0
    assert (out / "success.png").stat().st_size > 1000
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    load_policy(out / "checkpoints" / "final")
    text = capsys.readouterr().out
    assert "iter   2" in text and "approx_kl" in text and "clipfrac" in text

    res = tmp_path / "eval"
    assert main(["eval", "--policy", str(out / "checkpoints" / "final"), "--output-dir", str(res),
                 "--tasks", "tabletop/reach_red", "--init-states", "2", "--episodes-per-state", "1",
                 "--num-envs", "2", "--progress", "False"]) == 0
    assert json.loads((res / "results.json").read_text())["episodes"] == 2
    assert main(["eval", "--policy", str(tmp_path / "nope"), "--output-dir", str(res)]) == 2


def test_eval_writes_results_chart_and_videos(tmp_path, capsys, usage_error):
    res = tmp_path / "eval"
    # 3 episodes per task over the first 2 initial states: states 0, 1, 0
    assert main(["eval", "--policy", "tiny", "--output-dir", str(res), "--num-tasks", "2", "--init-states", "2",
                 "--episodes-per-task", "3", "--max-episode-steps", "3", "--videos", "1", "--num-envs", "4",
                 "--progress", "False"]) == 0
    out = json.loads((res / "results.json").read_text())
    assert out["episodes"] == 6 and out["env_steps"] == 6 * 3 and out["max_episode_steps"] == 3
    assert list(out["per_task"]) == ["tabletop/reach_red", "tabletop/reach_blue"]
    assert (res / "success.png").stat().st_size > 1000
    assert len(out["videos"]) == 2
    from PIL import Image
    gif = Image.open(res / out["videos"][0])
    assert gif.n_frames == 3 and gif.size == (64, 64)
    usage_error("not a libero suite",
                ["eval", "--policy", "tiny", "--env", "libero", "--suite", "tabletop", "--output-dir", str(res)])
    usage_error("--episodes-per-task must be an integer >= 1",
                ["eval", "--policy", "tiny", "--episodes-per-task", "0", "--output-dir", str(res)])


def test_config_file_and_bad_preset(tmp_path, usage_error):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"ppo": {"no_such_key": 1}}))
    usage_error("unknown config key 'ppo.no_such_key'", ["train", "--config", str(cfg)])
    usage_error("unknown preset", ["train", "--preset", "nope"])


def test_unknown_task_is_explained(tmp_path, capsys):
    code = main(["train", "--preset", "smoke", "--env.tasks", "tabletop/reach_rde", "--output-dir", str(tmp_path)])
    assert code == 2
    assert "reach_red" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path, usage_error):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    usage_error("cannot write to output directory", ["train", "--preset", "smoke", "--output-dir", str(ro / "x")])


def test_output_dir_that_is_a_file(tmp_path, usage_error):
    f = tmp_path / "file"
    f.write_text("x")
    usage_error("cannot write to output directory", ["train", "--preset", "smoke", "--output-dir", str(f)])


def test_short_train_options_and_benchmark_defaults():
    from vlarl_fast.cli import expand_aliases
    from vlarl_fast.config import EnvConfig, resolve_env
    assert expand_aliases(["--env", "libero", "--suite=libero_goal", "--policy", "p", "--env.reward", "sparse"]) == \
        ["--env.benchmark", "libero", "--env.suite=libero_goal", "--policy.policy", "p", "--env.reward", "sparse"]
    tab = resolve_env(EnvConfig())
    assert (tab.suite, tab.image_size, tab.reward, tab.num_envs) == ("tabletop", 64, "dense", 96)
    lib = resolve_env(EnvConfig(benchmark="libero", num_envs=2))
    assert (lib.suite, lib.image_size, lib.reward, lib.num_envs) == ("libero_spatial", 224, "sparse", 2)
    with pytest.raises(ValueError, match="add --env libero"):
        resolve_env(EnvConfig(suite="libero_goal"))
    with pytest.raises(ValueError, match="only the sparse"):
        resolve_env(EnvConfig(benchmark="libero", reward="dense"))


@pytest.mark.parametrize("ext", [True, False])
def test_backend_auto_uses_worker_processes_where_the_extension_is(monkeypatch, ext):
    from vlarl_fast import _ext
    from vlarl_fast.config import EnvConfig, resolve_env
    monkeypatch.setattr(_ext, "EXT_AVAILABLE", ext)
    for bench in ("tabletop", "libero"):
        assert resolve_env(EnvConfig(benchmark=bench)).backend == ("process" if ext else "inprocess")
        assert resolve_env(EnvConfig(benchmark=bench, backend="inprocess")).backend == "inprocess"


def test_train_on_libero_needs_a_checkpoint(tmp_path, usage_error):
    usage_error("no scripted expert", ["train", "--env", "libero", "--output-dir", str(tmp_path)])
    usage_error("not a tabletop suite", ["train", "--suite", "nope", "--output-dir", str(tmp_path)])


def test_attention_kernel_that_cannot_run_is_explained(tmp_path, capsys):
    code = main(["train", "--preset", "smoke", "--policy.attn-implementation", "flash_attention_2",
                 "--output-dir", str(tmp_path / "r")])
    assert code == 2
    assert "sdpa" in capsys.readouterr().err


def test_eval_on_heldout_layouts_records_the_split(tmp_path, usage_error):
    res = tmp_path / "eval"
    # the held-out split's protocol is one episode per layout: 2 layouts, 2 episodes
    assert main(["eval", "--policy", "tiny", "--output-dir", str(res), "--tasks", "tabletop/reach_red",
                 "--split", "heldout", "--init-states", "2", "--max-episode-steps", "2", "--num-envs", "2",
                 "--progress", "False"]) == 0
    out = json.loads((res / "results.json").read_text())
    assert out["split"] == "heldout" and out["episodes"] == 2 and len(out["per_state"]["tabletop/reach_red"]) == 2
    usage_error("has no 'heldout' split", ["eval", "--policy", "tiny", "--env", "libero", "--tasks",
                                           "libero_spatial/0", "--split", "heldout", "--output-dir", str(res)])


def test_smoke_train_with_heldout_evaluation(tmp_path, capsys, usage_error):
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--output-dir", str(out), "--progress", "False",
                 "--eval.heldout-episodes", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_episodes"] == 3
    assert 0.0 <= summary["heldout_sft_success"] <= 1.0 and 0.0 <= summary["heldout_rl_success"] <= 1.0
    text = capsys.readouterr().out
    # one final table: the fixed states' columns, then the held-out layouts' beside them
    assert "Success per task: fixed initial states and held-out layouts" in text
    header = text[text.index("Success per task: fixed"):text.index("reach_red")]
    assert header.index("fixed") < header.index("held-out") and header.count("delta") == 2
    assert set(summary["heldout_rl_per_task"]) == {"tabletop/reach_red"} and summary["rl_layouts"] == "open"
    usage_error(r"--eval.heldout-episodes 101 is outside \[0, 100\]",
                ["train", "--preset", "smoke", "--output-dir", str(out), "--eval.heldout-episodes", "101"])


def test_smoke_train_practises_on_the_open_stream(tmp_path, usage_error):
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--output-dir", str(out), "--progress", "False",
                 "--ppo.layouts", "open", "--eval.heldout-episodes", "0"]) == 0
    state = json.loads((out / "checkpoints" / "final" / "curriculum.json").read_text())
    # 2 iterations of 4 envs x 4 steps on a 25-step task: the first draws were fresh layouts 0, 1, ...
    assert state["kind"] == "open" and state["next_fresh"]["tabletop/reach_red"] >= 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_sft_success"] is summary["heldout_rl_success"] is summary["heldout_episodes"] is None
    # resuming on the fixed states cannot take the open stream's statistics
    usage_error("open stream of layouts",
                ["train", "--preset", "smoke", "--output-dir", str(tmp_path / "again"), "--progress", "False",
                 "--skip-sft", "True", "--ppo.layouts", "fixed", "--policy.policy", str(out / "checkpoints" / "final")])
    usage_error("--ppo.layouts open: libero_spatial/0 has no 'open' split",
                ["train", "--env", "libero", "--env.tasks", "libero_spatial/0", "--skip-sft", "True",
                 "--ppo.layouts", "open", "--output-dir", str(tmp_path / "lib")])


def test_auto_layouts_take_the_open_stream_where_every_task_has_one():
    from vlarl_fast.config import TrainConfig
    from vlarl_fast.train import resolve_layouts
    cfg = TrainConfig()
    assert cfg.ppo.layouts == "auto"
    assert resolve_layouts(cfg, ["tabletop/reach_red", "tabletop/lift_green"]) == "open"
    # LIBERO's suites have only their fixed initial states: auto falls back, an explicit 'open' is refused
    assert resolve_layouts(cfg, ["tabletop/reach_red", "libero_spatial/0"]) == "fixed"
    cfg.ppo.layouts = "open"
    with pytest.raises(SystemExit, match="--ppo.layouts open: libero_spatial/0 has no 'open' split"):
        resolve_layouts(cfg, ["libero_spatial/0"])
    cfg.ppo.layouts = "fixed"
    assert resolve_layouts(cfg, ["tabletop/reach_red"]) == "fixed"


def test_training_envs_refuse_the_heldout_split_even_if_asked(tmp_path, monkeypatch):
    import vlarl_fast.train as train_module
    monkeypatch.setattr(train_module, "env_options", lambda env: {"split": "heldout"})
    with pytest.raises(ValueError, match="'heldout' is reserved for evaluation"):
        main(["train", "--preset", "smoke", "--output-dir", str(tmp_path / "run"), "--progress", "False",
              "--env.backend", "inprocess", "--ppo.layouts", "fixed"])
