import math

import numpy as np
import pytest
import torch

from vlarl_fast.kernels import action_logprobs
from vlarl_fast.rl.ppo import explained_variance, normalize_advantages, normalize_advantages_grouped, ppo_losses


def test_ratio_one_gives_minus_mean_advantage():
    logp = torch.tensor([-1.0, -2.0])
    adv = torch.tensor([1.0, -3.0])
    pg, v, kl, cf = ppo_losses(logp, logp, adv, torch.zeros(2), torch.ones(2))
    assert pg.item() == pytest.approx(1.0)      # -(1 - 3) / 2
    assert v.item() == pytest.approx(0.5)       # 0.5 * mean((0 - 1)^2)
    assert kl.item() == pytest.approx(0.0)
    assert cf.item() == 0.0


def test_asymmetric_clipping_hand_computed():
    old = torch.zeros(4)
    # ratios 1.5, 1.5, 0.5, 0.5
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    pg, _, kl, cf = ppo_losses(new, old, adv, torch.zeros(4), torch.zeros(4), clip_low=0.2, clip_high=0.3)
    # per sample max(-A r, -A clip(r)):
    #  A=+1, r=1.5 -> max(-1.5, -1.3) = -1.3 ; A=-1, r=1.5 -> max(1.5, 1.3) = 1.5
    #  A=+1, r=0.5 -> max(-0.5, -0.8) = -0.5 ; A=-1, r=0.5 -> max(0.5, 0.8) = 0.8
    assert pg.item() == pytest.approx((-1.3 + 1.5 - 0.5 + 0.8) / 4)
    assert cf.item() == 1.0
    r = torch.tensor([1.5, 1.5, 0.5, 0.5])
    assert kl.item() == pytest.approx(((r - 1) - r.log()).mean().item(), rel=1e-6)


def test_gradient_vanishes_when_clipped():
    old = torch.zeros(1)
    new = torch.log(torch.tensor([2.0])).requires_grad_()
    pg, *_ = ppo_losses(new, old, torch.tensor([1.0]), torch.zeros(1), torch.zeros(1))
    pg.backward()
    assert new.grad.item() == 0.0


def test_normalize_and_explained_variance():
    a = normalize_advantages(torch.tensor([1.0, 2.0, 3.0]))
    assert a.mean().abs() < 1e-6 and a.std().item() == pytest.approx(1.0, rel=1e-5)
    y = torch.tensor([1.0, 2.0, 3.0])
    assert explained_variance(y, y) == pytest.approx(1.0)
    assert math.isnan(explained_variance(y, torch.ones(3)))


def test_grouped_normalisation_is_per_group():
    # task 0 has large advantages, task 1 small ones: each ends with mean 0 and std 1 on its own
    adv = torch.tensor([10.0, 20.0, 30.0, 0.1, 0.3, 0.2, 0.4])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    out = normalize_advantages_grouped(adv, groups)
    for g in (0, 1):
        sel = out[groups == g]
        assert sel.mean().abs() < 1e-6 and sel.std().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(out[:3], normalize_advantages(adv[:3]))
    # order inside a group is kept
    assert out[3] < out[5] < out[4] < out[6]


@pytest.mark.parametrize("N,H,V,start,temp", [(5, 8, 40, 0, 1.0), (13, 7, 300, 44, 0.7), (1, 3, 9, 8, 1.6)])
def test_action_logprobs_reference(N, H, V, start, temp):
    g = torch.Generator().manual_seed(N)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    targets = torch.randint(start, V, (N,), generator=g)
    logp, ent = action_logprobs(h, w, targets, temperature=temp, vocab_start=start, return_entropy=True)
    full = torch.log_softmax((h @ w[start:].T) / temp, -1)
    torch.testing.assert_close(logp, full.gather(1, (targets - start)[:, None]).squeeze(1))
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1))
    logp.sum().backward()
    assert h.grad is not None and w.grad is not None
    assert torch.all(w.grad[:start] == 0)


def test_action_logprobs_rejects_targets_outside_slice():
    with pytest.raises(ValueError, match="outside the vocab slice"):
        action_logprobs(torch.zeros(2, 3), torch.zeros(10, 3), torch.tensor([1, 9]), vocab_start=5)


def test_train_layers_freezes_all_but_the_top_of_the_policy():
    from vlarl_fast.policy.checkpoint import make_policy
    from vlarl_fast.rl.trainer import freeze_below_top_layers
    model = make_policy("tiny", instructions=["reach"], hidden_size=32, num_layers=3).model
    freeze_below_top_layers(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("lm.model.layers.2.", "lm.model.norm", "lm.lm_head", "value_head"))
                             for n in trainable)
    assert any(n.startswith("lm.model.layers.2.") for n in trainable)
    assert not any(n.startswith(("vision", "projector", "lm.model.layers.1.")) for n in trainable)
    with pytest.raises(ValueError, match="train-layers must be in"):
        freeze_below_top_layers(model, 4)


def test_lora_trains_only_adapters_and_critic():
    from vlarl_fast.config import PPOConfig
    from vlarl_fast.policy.checkpoint import make_policy
    from vlarl_fast.rl.trainer import train_lora_only
    model = make_policy("tiny", instructions=["reach"], hidden_size=32, num_layers=2).model
    train_lora_only(model, PPOConfig(lora_rank=4, lora_targets=("q_proj", "v_proj")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.startswith("value_head") for n in trainable)
    assert all("lora_" in n or n.startswith("value_head") for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 2 * 2


# ---- where GAE runs ------------------------------------------------------------------------
class _CountEnv:
    """A scripted env in gymnasium's API (no physics): reward = step index, terminates at step 3 of
    env 0's episodes, truncates at step 2 elsewhere, so a rollout holds both kinds of episode end."""

    def __init__(self, i: int):
        from gymnasium import spaces
        self.i = i
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (32, 32, 3), dtype=np.uint8),
            "state": spaces.Box(-np.inf, np.inf, (8,), dtype=np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, (7,), dtype=np.float32)
        self.t = 0

    def _obs(self):
        return {"image": np.full((32, 32, 3), 10 * self.t + self.i, np.uint8),
                "state": np.full(8, self.t, np.float32)}

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return self._obs(), {"instruction": GAE_INSTR[self.i % 2], "task_id": f"count/{self.i % 2}",
                             "init_state": 0}

    def step(self, action):
        self.t += 1
        term = self.i == 0 and self.t == 3
        trunc = not term and self.t == 2 and self.i != 0
        return self._obs(), float(self.t), term, trunc, {"success": term}

    def close(self):
        pass


GAE_INSTR = ["reach the red cube", "push it"]


def _gae_spy_run(device: str, monkeypatch) -> tuple[list, object]:
    """Two PPO iterations (critic warm-up, then a full update) of a tiny policy on ``device``, with
    ``kernels.gae`` as the trainer calls it recorded."""
    from vlarl_fast.config import PPOConfig
    from vlarl_fast.envs import VectorEnv
    from vlarl_fast.policy.checkpoint import make_policy
    from vlarl_fast.rl import trainer as trainer_mod
    calls = []
    real = trainer_mod.gae

    def spy(*args, **kw):
        out = real(*args, **kw)
        calls.append(([a.device for a in args[:5]], [o.device for o in out]))
        return out

    monkeypatch.setattr(trainer_mod, "gae", spy)
    pol = make_policy("tiny", instructions=GAE_INSTR, image_size=32, seed=0, hidden_size=32, num_layers=2,
                      value_hidden=16, device=device)
    cfg = PPOConfig(num_steps=4, minibatch_size=6, update_epochs=1, critic_warmup=1, train_layers=1,
                    target_kl=None, curriculum=False, norm_adv_per_task=True)
    envs = VectorEnv([lambda i=i: _CountEnv(i) for i in range(3)], backend="inprocess")
    try:
        tr = trainer_mod.PPOTrainer(pol, envs, cfg, seed=0)
        stats = [tr.train_iteration() for _ in range(2)]
    finally:
        envs.close()
    assert stats[0].critic_only and not stats[1].critic_only
    assert all(np.isfinite(s.v_loss) for s in stats) and np.isfinite(stats[1].pg_loss)
    return calls, tr


def test_trainer_gae_runs_on_the_policy_device(monkeypatch):
    calls, tr = _gae_spy_run("cpu", monkeypatch)
    dev = tr.policy.device
    assert len(calls) == 2
    assert all(d == dev for ins, outs in calls for d in ins + outs)


def test_rollout_buffer_keeps_the_gae_inputs_on_its_device():
    from vlarl_fast.rl.buffer import RolloutBuffer
    buf = RolloutBuffer(3, 2, device="meta")   # 'meta' stands in for an accelerator on a CPU machine
    for name in ("values", "next_values", "rewards", "terminated", "episode_end"):
        t = getattr(buf, name)
        assert t.device.type == "meta" and t.shape == (3, 2) and t.dtype == torch.float32, name
    # what the update re-runs the forward on stays in host memory
    assert buf.tokens.device.type == buf.logprobs.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_gae_runs_its_triton_kernel_on_the_gpu(monkeypatch):
    import vlarl_fast.kernels._triton_gae as tk
    launches = []
    real_kernel = tk._gae_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real_kernel[grid]

    monkeypatch.setattr(tk, "_gae_kernel", Spy())
    calls, tr = _gae_spy_run("cuda", monkeypatch)
    assert len(calls) == 2 and len(launches) == 2
    assert all(d.type == "cuda" for ins, outs in calls for d in ins + outs)
    assert tr.buffer.rewards.is_cuda and tr.buffer.values.is_cuda
