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


# ---------------------------------------------------------------------------------------------
# Float32 weights for what the stage trains (docs/precision.md)
# ---------------------------------------------------------------------------------------------
def test_stage_on_a_float32_model_steps_the_model_weights_themselves(policy):
    """No master copies for a float32 model: AdamW steps the very parameters it always stepped."""
    stage = SupervisedStage(policy, _expert(), steps=1, batch_size=4, learning_rate=1e-4, online_fraction=0.5)
    stage.run(None)
    trainable = [p for n, p in policy.model.named_parameters() if not n.startswith("value_head.")]
    assert not stage.masters.pairs
    assert [id(p) for g in stage.optimizer.param_groups for p in g["params"]] == [id(p) for p in trainable]


def _bf16_openvla_stage(steps, lr):
    from vlarl_fast.policy import VLAPolicy
    from vlarl_fast.policy.openvla import build_llama_tokenizer, random_tiny_openvla
    model = random_tiny_openvla(seed=2, value_hidden=16).to(torch.bfloat16)
    policy = VLAPolicy(model, build_llama_tokenizer(INSTR), None)
    size = model.config.image_size
    rng = np.random.default_rng(0)
    expert = {"images": rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8),
              "states": np.zeros((16, 1), np.float32), "actions": rng.uniform(-1, 1, (16, 7)).astype(np.float32),
              "instructions": [INSTR[i % 2] for i in range(16)]}
    policy.norm_stats = NormStats.from_actions(expert["actions"])
    return SupervisedStage(policy, expert, steps=steps, batch_size=8, learning_rate=lr, online_fraction=0.5,
                           weight_decay=0.0)


def test_stage_on_a_bf16_model_steps_float32_masters_and_moves_what_bf16_adamw_cannot():
    """20 steps at lr 5e-5: AdamW on the bfloat16 weights could not move any weight above 0.1 (its step, at
    most ~3.2 lr = 1.6e-4, is below half a bfloat16 step there, > |w| 2^-9 = 2e-4); the float32 masters
    accumulate the steps and carry the bfloat16 weights with them."""
    stage = _bf16_openvla_stage(steps=20, lr=5e-5)
    model = stage.policy.model
    freeze_below_top_layers(model, 1)   # as PPO leaves it: the stage unfreezes all but the value head
    watched = {n: p for n, p in model.named_parameters()
               if p.dim() > 1 and n.startswith(("language_model.model.layers.", "projector."))}
    before = {n: p.detach().clone() for n, p in watched.items()}
    value0 = [p.detach().clone() for p in model.value_head.parameters()]
    res = stage.run(None)
    assert res["steps"] == 20 and np.isfinite(res["loss"])
    # AdamW and its moments are float32; the model keeps its bfloat16 weights, rounded from the masters
    opt = stage.optimizer
    assert all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])
    state = [s for s in opt.state.values() if s]
    assert state and all(s[k].dtype == torch.float32 for s in state for k in ("exp_avg", "exp_avg_sq"))
    master = dict((id(p), m) for p, m in stage.masters.pairs)
    vision = [p for p in model.vision_backbone.parameters()]
    assert all(id(p) in master for p in vision)   # what RL froze trains through masters too
    for n, p in watched.items():
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), master[id(p)].detach().to(torch.bfloat16)), n
        big = before[n].abs() > 0.1
        moved = ((p.detach() != before[n]) & big).sum() / big.sum()
        assert moved > 0.2, (n, float(moved))   # measured: ~0.4
    assert all(torch.equal(a, b) for a, b in zip(value0, model.value_head.parameters()))
