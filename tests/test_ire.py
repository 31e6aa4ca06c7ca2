"""iRe-VLA's online data and supervised stage."""
import numpy as np
import pytest
import torch

from vlarl_fast.policy import NormStats, make_policy
from vlarl_fast.rl.ire import SupervisedStage
from vlarl_fast.rl.online_data import SuccessfulEpisodes
from vlarl_fast.rl.trainer import freeze_below_top_layers

INSTR = ["move the gripper to the red cube", "pick up the green cube"]


def _step(n, value, vocab=640):
    images = np.full((n, 64, 64, 3), value, dtype=np.uint8)
    states = np.full((n, 8), value, dtype=np.float32)
    tokens = np.full((n, 7), vocab - 1 - value, dtype=np.int64)
    return images, states, tokens


def test_successful_episodes_keep_only_successes_with_their_own_steps():
    rec = SuccessfulEpisodes(num_envs=2, capacity_steps=100)
    for t in range(3):
        images, states, tokens = _step(2, t)
        rec.record(images, states, tokens, INSTR)
        images[:] = 99   # the vector env reuses its buffers: what was recorded must not change
    rec.end(0, success=True)
    rec.end(1, success=False)
    assert len(rec.episodes) == 1 and rec.steps == 3 and rec.kept == 1
    data = rec.arrays()
    assert data["images"].shape == (3, 64, 64, 3) and data["tokens"].shape == (3, 7)
    assert [int(x) for x in data["images"][:, 0, 0, 0]] == [0, 1, 2]
    assert data["instructions"] == [INSTR[0]] * 3
    # slot 1's failed steps were dropped: its next episode starts empty
    rec.record(*_step(2, 7), INSTR)
    rec.end(1, success=True)
    assert rec.arrays()["images"].shape[0] == 4 and rec.episodes[-1]["instruction"] == INSTR[1]


def test_successful_episodes_evict_oldest_beyond_capacity():
    rec = SuccessfulEpisodes(num_envs=1, capacity_steps=6)
    for ep, length in enumerate([3, 2, 4]):
        for _ in range(length):
            rec.record(*_step(1, ep), INSTR[:1])
        rec.end(0, success=True)
    assert [int(e["images"][0, 0, 0, 0]) for e in rec.episodes] == [1, 2]   # episode 0 left first
    assert rec.steps == 6 and rec.kept == 3
    assert SuccessfulEpisodes(1, 10).arrays() is None
    with pytest.raises(ValueError, match="expected 1 slots"):
        rec.record(*_step(2, 0), INSTR)
    with pytest.raises(ValueError, match="capacity_steps"):
        SuccessfulEpisodes(1, 0)


@pytest.fixture()
def policy():
    torch.manual_seed(0)
    p = make_policy("tiny", instructions=INSTR, seed=0, hidden_size=32, num_layers=2)
    rng = np.random.default_rng(0)
    p.norm_stats = NormStats.from_actions(rng.uniform(-1, 1, (64, 7)).astype(np.float32))
    return p


def _expert(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
            "states": rng.normal(size=(n, 8)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, 7)).astype(np.float32),
            "instructions": [INSTR[i % 2] for i in range(n)]}


def _online(policy, n=24, seed=1):
    rng = np.random.default_rng(seed)
    vs = policy.model.vocab_start
    return {"images": rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
            "states": rng.normal(size=(n, 8)).astype(np.float32),
            "tokens": rng.integers(vs, vs + 256, (n, 7)),
            "instructions": [INSTR[i % 2] for i in range(n)]}


def _logp(policy, d):
    with torch.no_grad():
        imgs, st = policy.to_tensor_obs(d["images"], d["states"])
        ids, mask = policy.encode_prompts(d["instructions"])
        lp, _, _ = policy.evaluate_actions(policy.model.encode_images(imgs), st, ids, mask,
                                           torch.as_tensor(d["tokens"]))
    return float(lp.mean())


def test_stage_trains_whole_policy_on_online_successes_and_restores_rl_freezing(policy):
    model = policy.model
    freeze_below_top_layers(model, 1)
    for p in model.vision.parameters():
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    vision0 = [p.detach().clone() for p in model.vision.parameters()]
    value0 = [p.detach().clone() for p in model.value_head.parameters()]
    online = _online(policy)
    model.eval()
    before = _logp(policy, online)
    stage = SupervisedStage(policy, _expert(), steps=30, batch_size=16, learning_rate=1e-3, online_fraction=0.5)
    res = stage.run(online)
    assert res["steps"] == 30 and res["online_steps"] == 24 and np.isfinite(res["loss"])
    assert _logp(policy, online) > before + 0.5          # the successes became more likely
    assert [p.requires_grad for p in model.parameters()] == flags   # RL's frozen backbone is back
    assert any(not torch.equal(a, b) for a, b in zip(vision0, model.vision.parameters()))  # vision learnt
    assert all(torch.equal(a, b) for a, b in zip(value0, model.value_head.parameters()))  # critic untouched
    assert not model.training


def test_stage_batch_split_and_empty_data(policy):
    stage = SupervisedStage(policy, _expert(), steps=1, batch_size=10, learning_rate=1e-4, online_fraction=0.3)
    assert stage._split(5) == (3, 7)
    assert stage._split(0) == (0, 10)          # nothing online yet: demonstrations only
    only_online = SupervisedStage(policy, None, steps=1, batch_size=10, learning_rate=1e-4, online_fraction=0.3)
    assert only_online._split(5) == (10, 0)
    params = [p.detach().clone() for p in policy.model.parameters()]
    res = only_online.run(None)
    assert res["steps"] == 0 and np.isnan(res["loss"])
    assert all(torch.equal(a, b) for a, b in zip(params, policy.model.parameters()))
    with pytest.raises(ValueError, match="--ire.online-fraction"):
        SupervisedStage(policy, None, steps=1, batch_size=10, learning_rate=1e-4, online_fraction=1.5)


def test_balanced_online_rows_give_every_task_the_same_share():
    w = SupervisedStage._row_weights(["a"] * 9 + ["b"])
    assert w[:9].sum() == pytest.approx(0.5) and w[9] == pytest.approx(0.5)
