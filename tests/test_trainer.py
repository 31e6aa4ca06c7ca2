"""The trainer as a whole: PPO's bootstrap at time-limit cuts, bad steps skipped, steps a worker restart cut
short left out, and the group algorithms' rollouts (GRPO, RLOO) with dynamic sampling and the KL penalty."""
import json

import numpy as np
import pytest
import torch

from _faulty_envs import RaiseOnStep
from vlarl_fast.config import PPOConfig
from vlarl_fast.envs import VectorEnv, make_env
from vlarl_fast.policy import make_policy
from vlarl_fast.rl.curriculum import Curriculum
from vlarl_fast.rl.groups import GroupSchedule, group_advantages, group_advantages_reference, group_slot_tasks
from vlarl_fast.rl.trainer import MAX_SAMPLE_FACTOR, PPOTrainer

TASK = "tabletop/reach_red"
SIZE = 32


def _policy(seed=0):
    """A tiny VLA whose value head is not the fresh one's zero, so that values tell observations apart."""
    from vlarl_fast.envs import get_task
    pol = make_policy("tiny", instructions=[get_task(TASK).instruction, get_task("tabletop/reach_blue").instruction],
                      image_size=SIZE, seed=seed, hidden_size=32, num_layers=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pol.model.value_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return pol


def _fns(n, max_steps=3, tasks=(TASK,)):
    return [(lambda t=tasks[i % len(tasks)], i=i: make_env(t, image_size=SIZE, seed=10 + i, max_episode_steps=max_steps))
            for i in range(n)]


def _cfg(**kw):
    base = dict(num_steps=5, minibatch_size=4, update_epochs=1, critic_warmup=0, target_kl=None, train_layers=1)
    return PPOConfig(**(base | kw))


def test_time_limit_cut_bootstraps_from_the_final_observation_not_the_next_episode():
    pol = _policy()
    calls = []
    value = pol.value

    def spy(images, states, instructions):
        v = value(images, states, instructions)
        calls.append((np.array(states), v.clone()))
        return v

    with VectorEnv(_fns(2), backend="inprocess") as envs:
        tr = PPOTrainer(pol, envs, _cfg(), seed=0)
        pol.value = spy
        tr.collect()
    buf = tr.buffer
    # 3-step episodes: step 2 is a time-limit cut for both envs (a random policy does not reach in 3 steps)
    assert buf.episode_end[2].tolist() == [1.0, 1.0] and buf.terminated[2].tolist() == [0.0, 0.0]
    cut_states, cut_values = calls[0]   # the first value call: the final observations of step 2
    assert torch.equal(buf.next_values[2], cut_values)
    # the final observation is not the next episode's first (which the rollout stores at step 3)
    assert not np.allclose(cut_states, buf.states[3].numpy())
    assert not torch.allclose(buf.next_values[2], buf.values[3])
    # within an episode, the next value is the next row's; after the last row, V(the current observation)
    assert torch.equal(buf.next_values[:2], buf.values[1:3])
    assert torch.equal(buf.next_values[4], calls[-1][1])
    assert buf.valid[:5].all()


def test_non_finite_log_probs_and_values_skip_the_update_instead_of_raising():
    pol = _policy()
    with VectorEnv(_fns(2), backend="inprocess") as envs:
        tr = PPOTrainer(pol, envs, _cfg(recompute_logprobs="off"), seed=0)
        tr.collect()
        before = {n: p.detach().clone() for n, p in pol.model.named_parameters()}
        head = pol.model.lm_head_weight
        saved = head.detach().clone()
        with torch.no_grad():   # a NaN in the trained LM head: every log-prob of the update is NaN
            head[pol.model.vocab_start] = float("nan")
        out = tr.update(critic_only=False)
        assert out["skipped_updates"] == 3   # 10 rows in minibatches of 4
        for n, p in pol.model.named_parameters():   # no step was taken
            if p is not head:
                assert torch.equal(p, before[n]), n
        with torch.no_grad():
            head.copy_(saved)
        tr.buffer.values[1, 0] = float("nan")   # a diverged critic: GAE has no target
        assert tr.update(critic_only=False)["skipped_updates"] == 1
        tr.buffer.values[1, 0] = 0.0
        out = tr.update(critic_only=False)
        assert out["skipped_updates"] == 0 and np.isfinite(out["pg_loss"])
        # the recomputed behaviour log-probs are checked too: no ratio is taken against a NaN
        tr.recompute_logprobs = True
        with torch.no_grad():
            pol.model.lm_head_weight[pol.model.vocab_start + 1] = float("inf")
        out = tr.update(critic_only=False)
        assert out["skipped_updates"] == 1 and np.isnan(out["pg_loss"])


@pytest.mark.skipif(not __import__("vlarl_fast._ext", fromlist=["x"]).EXT_AVAILABLE,
                    reason="needs the compiled extension (worker processes)")
def test_step_cut_short_by_a_worker_restart_is_left_out_not_bootstrapped(tmp_path):
    marker = str(tmp_path / "raised")
    fns = _fns(2, max_steps=10)
    fns[1] = lambda: RaiseOnStep(make_env(TASK, image_size=SIZE, seed=11, max_episode_steps=10), 3, marker)
    pol = _policy()
    with VectorEnv(fns, backend="process", num_workers=2) as envs:
        tr = PPOTrainer(pol, envs, _cfg(num_steps=6), seed=0)
        with pytest.warns(RuntimeWarning, match="restarted"):
            roll = tr.collect()
        buf = tr.buffer
        # env 1's third step (t=2) was lost: out of the update, its episode ended there, nothing terminated
        assert roll["lost_steps"] == 1
        assert not buf.valid[2, 1] and buf.valid.sum() == 11
        assert buf.episode_end[2, 1] == 1 and buf.terminated[2, 1] == 0 and buf.rewards[2, 1] == 0
        # no target from the fresh episode: the step before ends the episode and bootstraps from V(s_2)
        assert buf.episode_end[1, 1] == 1 and buf.next_values[1, 1] == buf.values[2, 1]
        from vlarl_fast.kernels import gae
        adv, _ = gae(buf.rewards, buf.values, buf.next_values, buf.terminated, buf.episode_end, 0.99, 0.95)
        expected = buf.rewards[1, 1] + 0.99 * buf.values[2, 1] - buf.values[1, 1]
        assert adv[1, 1] == pytest.approx(float(expected), abs=1e-6)
        assert tr.update(critic_only=False)["skipped_updates"] == 0


# ---- group algorithms -------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_advantages_match_the_definitions(algo):
    rng = np.random.default_rng(0)
    for sizes in ([2], [3, 5], [1, 4, 2], [8, 8, 7]):   # a group of 1: its mates were lost to restarts
        groups = np.concatenate([np.full(k, g) for g, k in enumerate(sizes)])
        returns = rng.normal(size=len(groups)).astype(np.float32)
        fast = group_advantages(returns, groups, algo)
        assert np.allclose(fast, group_advantages_reference(returns.tolist(), groups.tolist(), algo), atol=1e-5)
        for g, k in enumerate(sizes):   # both estimators centre each group
            assert abs(fast[groups == g].sum()) < 1e-4
    same = group_advantages(np.ones(4), np.zeros(4, dtype=int), algo)
    assert np.array_equal(same, np.zeros(4))   # identical returns: no signal, and no NaN


def test_group_schedule_deals_one_state_per_group_round():
    draws = iter(range(100))
    sched = GroupSchedule(group_slot_tasks(["a", "b"], 4, 2), 2, lambda task: next(draws))
    assert sched.slot_task == ["a", "a", "b", "b"]
    first = [sched(i)["init_state"] for i in (0, 2, 1, 3)]
    assert first == [0, 1, 0, 1]
    # slot 0 runs ahead (its mate's episode goes on): it takes the group's next draw, and slot 1 the same one later
    assert sched(0)["init_state"] == 2 and sched(0)["init_state"] == 3
    assert sched(1)["init_state"] == 2 and sched(1)["init_state"] == 3
    with pytest.raises(ValueError, match="not a multiple of --ppo.group-size 2"):
        GroupSchedule(["a"] * 3, 2, lambda t: 0)
    with pytest.raises(ValueError, match="share one task"):
        GroupSchedule(["a", "b"], 2, lambda t: 0)


def _group_trainer(algo, **kw):
    """4 envs in 2 groups of 2 (reach_red, reach_blue); slot i's episodes end at 4 + 2i steps."""
    pol = _policy()
    tasks = group_slot_tasks([TASK, "tabletop/reach_blue"], 4, 2)
    cur = Curriculum({TASK: 20, "tabletop/reach_blue": 20}, seed=0)
    sched = GroupSchedule(tasks, 2, cur.sample)
    fns = [(lambda t=t, i=i: make_env(t, image_size=SIZE, seed=10 + i, max_episode_steps=4 + 2 * i))
           for i, t in enumerate(tasks)]
    envs = VectorEnv(fns, backend="inprocess", reset_options=sched)
    tr = PPOTrainer(pol, envs, _cfg(algo=algo, group_size=2, **kw), seed=0, curriculum=cur)
    return tr, envs


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_rollout_runs_whole_groups_from_one_state_and_drops_uninformative_ones(algo):
    tr, envs = _group_trainer(algo)
    with envs:
        assert envs.init_states[0] == envs.init_states[1] and envs.init_states[2] == envs.init_states[3]
        roll = tr.collect()
        buf = tr.buffer
        # nothing succeeds in 4-10 steps from a random policy: every group is dropped, nothing is learnt
        assert roll["groups_kept"] == 0 and roll["groups_dropped"] >= 2 and not buf.valid.any()
        assert tr.update(critic_only=False)["skipped_updates"] == 0
        # episodes are whole: each slot's episode ran to its own time limit (slot i: 4 + 2i steps), the
        # idle rows of slots that finished first are not rows of any episode
        ep = buf.episode[:buf.T]
        for e in torch.unique(ep[ep >= 0]).tolist():
            slots = torch.unique(torch.nonzero(ep == e)[:, 1]).tolist()
            assert len(slots) == 1 and int((ep == e).sum()) == 4 + 2 * slots[0]
        # at least a batch's worth (4 x 5 kept steps) was tried for, within MAX_SAMPLE_FACTOR batches
        assert 20 <= tr.global_step <= MAX_SAMPLE_FACTOR * 20 + 4 + 6 + 8 + 10


def test_group_rollout_without_filtering_learns_from_every_group_with_its_advantages():
    tr, envs = _group_trainer("rloo", filter_groups=False, kl_coef=0.5)
    with envs:
        tr.collect()
        buf = tr.buffer
        assert buf.valid[:buf.T].sum() == (buf.episode[:buf.T] >= 0).sum()   # every episode's rows are learnt
        eps = torch.unique(buf.episode[:buf.T][buf.valid[:buf.T]])
        assert len(eps) >= 4 and np.isfinite(tr.episode_adv).all()
        for g in range(0, len(eps), 2):   # RLOO advantages of a pair: r0 - r1 and r1 - r0
            assert tr.episode_adv[g] == pytest.approx(-tr.episode_adv[g + 1], abs=1e-5)
        out = tr.update(critic_only=False)
        # before the first step the policy is its own reference: the KL penalty starts at 0
        assert out["skipped_updates"] == 0 and np.isfinite(out["pg_loss"]) and out["kl_ref"] >= 0
        assert np.isnan(out["v_loss"]) and np.isnan(out["explained_variance"])   # no critic


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_smoke_train_with_a_group_algorithm_records_it(tmp_path, algo):
    from vlarl_fast.cli import main
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--output-dir", str(out), "--progress", "False", "--ppo.algo", algo,
                 "--eval.heldout-episodes", "0"]) == 0
    assert json.loads((out / "config.json").read_text())["ppo"]["algo"] == algo
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == algo and summary["updates"] >= 1
    # the smoke preset's env-step budget: 2 iterations x 4 steps x 4 envs
    assert summary["env_steps"] >= 32


def test_group_algorithm_settings_are_checked_before_any_work(tmp_path, usage_error):
    for argv, pattern in [(["--ppo.group-size", "3"], r"--env\.num-envs 4 must be a multiple of --ppo\.group-size 3"),
                          (["--ppo.curriculum", "False"], r"needs --ppo\.curriculum True")]:
        out = tmp_path / "run"
        usage_error(pattern, ["train", "--preset", "smoke", "--output-dir", str(out), "--ppo.algo", "grpo", *argv])
        assert not (out / "config.json").exists()


def test_kl_reference_of_a_lora_policy_is_its_base_with_the_adapters_off():
    pol = _policy()
    with VectorEnv(_fns(2), backend="inprocess") as envs:
        tr = PPOTrainer(pol, envs, _cfg(lora_rank=4, lora_alpha=8.0, kl_coef=0.1), seed=0)
        assert tr.reference.frozen is None   # no second copy of the weights
        tr.collect()
    data, idx = tr.buffer.flat(), np.arange(6)
    tokens = data["tokens"][idx]
    lora_b = [p for n, p in pol.model.named_parameters() if "lora_B" in n]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_b:   # adapters that change the policy
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        adapted = tr._score(data, idx, tokens, False)[0]
        with tr.reference.active():
            ref = tr._score(data, idx, tokens, False)[0]
        saved = [p.clone() for p in lora_b]
        for p in lora_b:
            p.zero_()
        base = tr._score(data, idx, tokens, False)[0]
        for p, s in zip(lora_b, saved):
            p.copy_(s)
    assert torch.allclose(ref, base, atol=1e-6) and not torch.allclose(adapted, base, atol=1e-3)
    assert all(p.requires_grad for p in lora_b)   # the trainer's choice of what learns survives the switch
    out = tr.update(critic_only=False)
    assert out["kl_ref"] > 0 and out["skipped_updates"] == 0


# ---- pipelined rollout ------------------------------------------------------------------------

def _rollouts(rollout, backend, iterations=2):
    """Buffers of ``iterations`` greedy rollouts (no update between them) on 4 envs of 2 tasks (2 workers: the
    pipelined halves are the even and the odd envs), with episodes short enough to end and restart from the
    curriculum's fresh layouts."""
    from vlarl_fast.rl.curriculum import OpenCurriculum
    tasks = [TASK, "tabletop/reach_blue"]
    cur = OpenCurriculum(tasks, fresh=1.0, seed=0)
    slot = [tasks[i % 2] for i in range(4)]
    fns = [(lambda t=t, i=i: make_env(t, image_size=SIZE, seed=10 + i, max_episode_steps=3 + i, split="open"))
           for i, t in enumerate(slot)]
    out = []
    extra = {"num_workers": 2} if backend == "process" else {}
    with VectorEnv(fns, backend=backend, reset_options=lambda i: {"init_state": cur.sample(slot[i])},
                   **extra) as envs:
        tr = PPOTrainer(_policy(), envs, _cfg(rollout=rollout, num_steps=7), seed=0, curriculum=cur)
        tr.greedy = True
        for _ in range(iterations):
            tr.collect()
            b = tr.buffer
            out.append({k: getattr(b, k)[:b.T].clone() for k in ("tokens", "rewards", "terminated", "episode_end",
                                                                  "states", "obs", "values", "next_values")})
        out.append(cur.state_dict())
    return out


def test_rollout_auto_pipelines_only_envs_in_worker_processes():
    from types import SimpleNamespace

    from vlarl_fast.rl.trainer import pipelined
    workers, inproc = SimpleNamespace(num_envs=4, backend="process"), SimpleNamespace(num_envs=4, backend="inprocess")
    assert pipelined("auto", workers) and not pipelined("auto", inproc)
    assert pipelined("pipelined", inproc) and not pipelined("sync", workers)
    assert not pipelined("pipelined", SimpleNamespace(num_envs=1, backend="process"))   # nothing to alternate
    with pytest.raises(ValueError, match="use auto, sync or pipelined"):
        pipelined("async", workers)


@pytest.mark.parametrize("backend", ["inprocess", "process"])
def test_pipelined_rollout_gives_each_env_the_synchronous_episodes(backend):
    if backend == "process" and not __import__("vlarl_fast._ext", fromlist=["x"]).EXT_AVAILABLE:
        pytest.skip("needs the compiled extension (worker processes)")
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # the pipelined rollout decodes on one thread here: the same arithmetic for both
    try:
        sync, piped = _rollouts("sync", backend), _rollouts("pipelined", backend)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(sync[:-1], piped[:-1]):
        for k in ("tokens", "rewards", "terminated", "episode_end", "states", "obs"):
            assert torch.equal(a[k], b[k]), k
        for k in ("values", "next_values"):   # batches of 2 and of 4 round differently
            assert torch.allclose(a[k], b[k], atol=1e-5), k
        assert a["episode_end"].sum() >= 4   # episodes ended and restarted within the rollouts
    assert sync[-1] == piped[-1]   # the curriculum saw the same episodes in the same order


def test_pipeline_halves_give_each_half_workers_of_its_own():
    from vlarl_fast.rl.trainer import pipeline_halves
    with VectorEnv(_fns(5), backend="inprocess") as envs:
        assert [h.tolist() for h in pipeline_halves(envs)] == [[0, 1], [2, 3, 4]]
    if not __import__("vlarl_fast._ext", fromlist=["x"]).EXT_AVAILABLE:
        return
    with VectorEnv(_fns(6), backend="process", num_workers=2) as envs:   # env i on worker i % 2
        assert [h.tolist() for h in pipeline_halves(envs)] == [[0, 2, 4], [1, 3, 5]]
    with VectorEnv(_fns(2), backend="process", num_workers=1) as envs:
        assert [h.tolist() for h in pipeline_halves(envs)] == [[0], [1]]
