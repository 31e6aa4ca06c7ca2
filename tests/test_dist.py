"""Data-parallel training on torch.distributed (gloo on the CPU): the gradient of two ranks is that of one
process over both minibatches, the shared statistics are every rank's, a 2-rank run keeps its ranks' weights
identical, and a launcher never leaves processes behind."""
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from vlarl_fast.dist.comm import Comm
from vlarl_fast.dist.launch import free_port
from vlarl_fast.dist.shared import merge_evals, merge_iteration
from vlarl_fast.rl.ppo import normalize_advantages_grouped

SMOKE = ["--preset", "smoke", "--progress", "False", "--eval.heldout-episodes", "0", "--eval.init-states", "1",
         "--tensorboard", "False"]


# ---- within one process -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,groups", [(7, 3), (64, 5), (2, 1)])
def test_grouped_normalisation_over_ranks_is_that_of_the_whole_batch(n, groups):
    g = torch.Generator().manual_seed(n)
    adv = torch.randn(2 * n, generator=g) * 3 + 1
    ids = torch.randint(0, groups, (2 * n,), generator=g)
    ids[0] = groups - 1   # a group may live on one rank only
    whole = normalize_advantages_grouped(adv, ids)
    halves = [(adv[:n], ids[:n]), (adv[n:], ids[n:])]

    def stats(a, i):
        x = a.double()
        return np.concatenate([torch.bincount(i, minlength=groups).double().numpy(),
                               torch.zeros(groups, dtype=torch.float64).index_add_(0, i, x).numpy(),
                               torch.zeros(groups, dtype=torch.float64).index_add_(0, i, x * x).numpy()])
    total = stats(*halves[0]) + stats(*halves[1])   # what the all-reduce over the two ranks returns
    parts = [normalize_advantages_grouped(a, i, reduce_sum=lambda _: total, num_groups=groups) for a, i in halves]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)


def test_iteration_figures_merge_by_episodes_and_sums():
    base = {"iteration": 3, "env_steps": 100, "sps": 50.0, "episodes": 2, "success": 1.0, "episode_return": 2.0,
            "pg_loss": 0.1, "v_loss": 0.2, "entropy": 1.0, "approx_kl": 0.01, "clipfrac": 0.1,
            "explained_variance": 0.5, "critic_only": False, "skipped_updates": 0, "kl_ref": float("nan"),
            "prm_seconds": float("nan"), "groups_kept": 1, "groups_dropped": 0, "lost_steps": 0,
            "rollout_seconds": 2.0, "update_seconds": 1.0}
    other = {**base, "env_steps": 100, "episodes": 6, "success": 0.5, "episode_return": 0.0, "pg_loss": 0.3,
             "skipped_updates": 1, "lost_steps": 2, "rollout_seconds": 2.5, "update_seconds": 0.5}
    m = merge_iteration([base, other])
    assert m["env_steps"] == 200 and m["episodes"] == 8 and m["sps"] == 100.0 and m["lost_steps"] == 2
    assert m["success"] == pytest.approx((2 * 1.0 + 6 * 0.5) / 8)
    assert m["episode_return"] == pytest.approx(2 * 2.0 / 8)
    assert m["pg_loss"] == pytest.approx(0.2) and m["skipped_updates"] == 1 and m["iteration"] == 3
    assert m["rollout_seconds"] == 2.5 and m["update_seconds"] == 1.0   # the slowest rank's


def test_evaluations_of_task_shares_merge_into_one():
    a = {"per_task": {"t0": 0.5, "t2": 1.0}, "per_state": {"t0": [0.5], "t2": [1.0]}, "success": 0.0,
         "episodes": 6, "env_steps": 40, "split": "fixed", "episodes_per_task": {"t0": 4, "t2": 2}}
    b = {"per_task": {"t1": 0.0}, "per_state": {"t1": [0.0]}, "success": 0.0, "episodes": 4, "env_steps": 30,
         "split": "fixed", "episodes_per_task": {"t1": 4}}
    m = merge_evals([a, b, None], ["t0", "t1", "t2"])
    assert list(m["per_task"]) == ["t0", "t1", "t2"] and m["episodes"] == 10 and m["env_steps"] == 70
    assert m["success"] == pytest.approx((0.5 * 4 + 0 + 1.0 * 2) / 10)


# ---- two gloo ranks ------------------------------------------------------------------------------------------
def _two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from vlarl_fast.dist.shared import SharedCurriculum, gather_successes
    from vlarl_fast.policy import make_policy
    from vlarl_fast.rl.curriculum import OpenCurriculum
    from vlarl_fast.rl.online_data import SuccessfulEpisodes
    from vlarl_fast.rl.ppo import ppo_losses
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    comm = Comm(rank=rank, world=2)
    result = {}

    # the averaged gradient of the two ranks' halves against one process's gradient of the whole minibatch
    policy = make_policy("tiny", instructions=["reach the red cube", "lift it"], image_size=32, seed=0,
                         hidden_size=32, num_layers=1)
    model = policy.model
    g = torch.Generator().manual_seed(1)
    B = 8
    images = torch.randint(0, 255, (B, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
    states = torch.randn(B, 8, generator=g).numpy()
    instructions = ["reach the red cube", "lift it"] * (B // 2)
    out0 = policy.act(images, states, instructions, generator=torch.Generator().manual_seed(2))
    tokens, old = out0.tokens, out0.logprobs.sum(-1).detach()
    adv = torch.randn(B, generator=g)

    def loss_of(rows):
        ids, mask = policy.encode_prompts([instructions[i] for i in rows])
        feats = model.encode_images(model.preprocess_images(torch.as_tensor(images[rows])))
        logp, _, values = policy.evaluate_actions(feats, torch.as_tensor(states[rows]), ids, mask, tokens[rows])
        pg, v, _, _ = ppo_losses(logp.sum(-1), old[rows], adv[rows], values, values.detach() + 1, clip_low=0.2,
                                 clip_high=0.2)
        return pg + 0.5 * v

    class Whole(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, rows):
            return loss_of(rows)

    model.zero_grad()
    loss_of(list(range(B))).backward()
    single = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ddp = DistributedDataParallel(Whole(), find_unused_parameters=True)
    ddp(list(range(rank * B // 2, (rank + 1) * B // 2))).backward()
    averaged = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    result["grad_keys_equal"] = sorted(single) == sorted(averaged)
    result["grad_max_diff"] = max(float((single[k] - averaged[k]).abs().max()) for k in single)

    # the curriculum's statistics are every rank's; its fresh layouts are the rank's own
    cur = SharedCurriculum(OpenCurriculum(["t"], fresh=1.0, stride=2, offset=rank, seed=rank), comm)
    drawn = [cur.sample("t") for _ in range(3)]
    for k in drawn:
        cur.update("t", k, success=k % 4 == 0)
    cur.sync()
    result["drawn"] = drawn
    result["pool"] = sorted((k, list(o)) for k, o in cur.inner.pool["t"].items())

    # iRe-VLA's successful episodes end up in rank 0's buffer
    rec = SuccessfulEpisodes(1, 1000)
    rec.add({"images": np.zeros((2 + rank, 4, 4, 3), np.uint8), "states": np.zeros((2 + rank, 8), np.float32),
             "tokens": np.zeros((2 + rank, 7), np.int64), "instruction": f"rank {rank}"})
    gather_successes(rec, comm)
    result["episodes"] = [e["instruction"] for e in rec.episodes]
    result["steps"] = rec.steps
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    del ddp   # its reducer goes while the process group is alive (see dist.launch.run_rank)
    gc.collect()
    dist.destroy_process_group()


def test_two_gloo_ranks_average_gradients_and_share_statistics(tmp_path):
    import torch.multiprocessing as mp
    mp.start_processes(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["grad_keys_equal"] and r["grad_max_diff"] < 1e-5
    assert r0["drawn"] == [0, 2, 4] and r1["drawn"] == [1, 3, 5]   # never the same fresh layout
    assert r0["pool"] == r1["pool"] and [k for k, _ in r0["pool"]] == [0, 1, 2, 3, 4, 5]
    assert r0["episodes"] == ["rank 0", "rank 1"] and r0["steps"] == 5
    assert r1["episodes"] == [] and r1["steps"] == 0


# ---- whole runs -----------------------------------------------------------------------------------------------
# the commands run where the source tree cannot shadow the installed package (as a user's would)
def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "vlarl_fast.cli", "train", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.mark.parametrize("variant", [[], ["--ppo.lora-rank", "4"],
                                     ["--ppo.algo", "grpo", "--ppo.filter-groups", "False"]],
                         ids=["top-layer", "lora", "grpo"])
def test_two_rank_smoke_run_keeps_the_ranks_identical_after_every_update(tmp_path, variant):
    run = tmp_path / "run"
    # no supervised stages: they broadcast rank 0's weights, which would hide a rank that drifted in PPO
    p = _cli(*SMOKE, *variant, "--dist.nproc", "2", "--ppo.iterations", "3", "--ire.every", "0",
             "--checkpoint-every", "1", "--checkpoint-keep", "10", "--output-dir", str(run), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["algo"] == ("grpo" if "grpo" in variant else "ppo")
    assert json.loads((run / "config.json").read_text())["dist"]["nproc"] == 2
    history = json.loads((run / "history.json").read_text())
    if "grpo" not in variant:
        # the global env-step count: 4 envs x 4 steps a iteration, two envs on each rank
        assert summary["updates"] == 3 and [h["env_steps"] for h in history] == [16, 32, 48]
    dirs = sorted((run / "checkpoints").glob("rl-*"))
    assert len(dirs) == summary["updates"] and dirs[0].name == "rl-00001"
    for d in dirs:
        a = torch.load(d / "state.pt", weights_only=False)
        b = torch.load(d / "state.rank1.pt", weights_only=False)
        assert a["world_size"] == b["world_size"] == 2
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (d.name, k)
        if "grpo" not in variant:   # (a group rollout runs its episodes to their ends)
            # the ranks step different envs: their episodes in progress differ
            assert not all(np.array_equal(x, y) for x, y in zip(a["envs"]["actions"], b["envs"]["actions"]))


def test_two_rank_full_fine_tuning_with_supervised_stages_finishes(tmp_path):
    """Every layer trained (parameters PPO's forward leaves unused included) with rank 0's supervised stage in
    between: the stage's backward outside DDP once made DDP's next update fail on rank 0."""
    run = tmp_path / "run"
    p = _cli(*SMOKE, "--dist.nproc", "2", "--ppo.train-layers", "0", "--ppo.iterations", "3", "--ire.every", "1",
             "--ppo.critic-warmup", "0", "--output-dir", str(run), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["updates"] == 3


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _start(run: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlarl_fast.cli", "train", *SMOKE, "--dist.nproc", "2",
                             "--ppo.iterations", "400", "--checkpoint-every", "0", "--output-dir", str(run), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=run.parent)


def _wait_for_rl(p: subprocess.Popen, run: Path, timeout: float = 300) -> list[psutil.Process]:
    """Until the ranks are in RL (the first iteration's line), and the launcher's processes then."""
    end = time.time() + timeout
    while time.time() < end:
        if (run / "config.json").exists() and p.poll() is None:
            line = p.stdout.readline()
            if line.startswith("iter"):
                return _descendants(p.pid)
        assert p.poll() is None, p.stderr.read()[-3000:]
    raise AssertionError("the run did not reach RL")


def _gone(procs: list[psutil.Process], timeout: float = 30) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


def test_ctrl_c_stops_every_rank_with_a_checkpoint_that_resumes(tmp_path):
    run = tmp_path / "run"
    p = _start(run)
    procs = _wait_for_rl(p, run)
    assert len(procs) >= 4   # two ranks and their env workers
    os.killpg(p.pid, signal.SIGINT)   # Ctrl-C reaches the whole foreground group
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert f"resume with: vlarl-fast train --resume {run}" in out
    ckpt = sorted((run / "checkpoints").glob("rl-*"))[-1]
    assert (ckpt / "state.pt").is_file() and (ckpt / "state.rank1.pt").is_file()
    assert _gone(procs)
    it = int(ckpt.name.split("-")[1])
    r = _cli("--resume", str(run), "--ppo.iterations", str(it + 1), "--progress", "False", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed"] and summary["updates"] == it + 1


def test_a_killed_rank_stops_the_run_and_leaves_no_process(tmp_path):
    run = tmp_path / "run"
    p = _start(run)
    procs = _wait_for_rl(p, run)
    ranks = psutil.Process(p.pid).children()   # the two ranks (their env workers are theirs)
    assert len(ranks) >= 2
    victim = max(ranks, key=lambda q: q.pid)
    victim.kill()
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "died (signal SIGKILL)" in err and "the other ranks were stopped" in err, err[-3000:]
    assert _gone(procs)


def test_a_bad_split_fails_before_any_rank_starts(tmp_path, usage_error):
    out = ["--output-dir", str(tmp_path)]
    usage_error(r"--env.num-envs 4 must be a multiple of --dist.nproc 3",
                ["train", *SMOKE, "--dist.nproc", "3", *out])
    usage_error(r"each rank's 2 envs must be a multiple of --ppo.group-size 4",
                ["train", *SMOKE, "--dist.nproc", "2", "--ppo.algo", "grpo", "--ppo.group-size", "4", *out])
    usage_error(r"--dist.nproc must be an integer >= 1", ["train", *SMOKE, "--dist.nproc", "0", *out])


def test_ray_local_runs_the_ranks_as_ray_train_workers(tmp_path):
    pytest.importorskip("ray.train", reason="the dist extra (Ray Train) is not installed")
    run = tmp_path / "run"
    p = _cli(*SMOKE, "--dist.nproc", "2", "--dist.ray", "local", "--output-dir", str(run), cwd=tmp_path)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 2
