"""The update from cached frozen-layer inputs (``--ppo.cache-frozen-layers``) against the full forward."""
import numpy as np
import pytest
import torch

from vlarl_fast.config import PPOConfig
from vlarl_fast.envs import VectorEnv, make_env
from vlarl_fast.policy import make_policy
from vlarl_fast.rl.buffer import RolloutBuffer
from vlarl_fast.rl.trainer import PPOTrainer, frozen_layer_cache

INSTR = ["reach the red cube", "put the blue cube on the purple zone and then come back", "push it"]


def _policy(impl="fast"):
    pol = make_policy("tiny", instructions=INSTR, image_size=32, seed=0, hidden_size=32, num_layers=3,
                      value_hidden=16)
    for p in pol.model.value_head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    pol.decode_impl = impl
    return pol


def _obs(B, seed, instr):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (B, 32, 32, 3), dtype=np.uint8), rng.normal(size=(B, 8)).astype(np.float32),
            [instr[i % len(instr)] for i in range(B)])


@pytest.mark.parametrize("impl", ["fast", "static"])
@pytest.mark.parametrize("first_layer", [0, 2])
def test_update_from_frozen_inputs_equals_the_full_forward(impl, first_layer):
    pol = _policy(impl)
    buf = RolloutBuffer(2, 3)
    # step 0 holds the longest instruction, step 1 only short ones: rows of both need re-padding together
    for t, instr in enumerate((INSTR, [INSTR[0], INSTR[2]])):
        images, states, ins = _obs(3, t, instr)
        out = pol.act(images, states, ins, generator=torch.Generator().manual_seed(t), capture_layer=first_layer)
        buf.add(t, out.vision_feats, torch.as_tensor(states), out.tokens, out.logprobs, out.values, ins, out.frozen)
    data = buf.flat()
    idx = np.array([4, 0, 5, 1, 3])   # mixed steps, odd count
    fr = buf.frozen_rows(idx)
    assert fr.hidden.shape[1] == buf.frozen[0].hidden.shape[1] > buf.frozen[1].hidden.shape[1]
    tokens = data["tokens"][idx]
    ids, mask = pol.encode_prompts([data["instructions"][i] for i in idx])
    ref = pol.evaluate_actions(data["obs"][idx], data["states"][idx], ids, mask, tokens)
    fast = pol.evaluate_frozen(fr, tokens, first_layer)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # and both equal the rollout's own log-probs and values
    torch.testing.assert_close(fast[0], data["logprobs"][idx], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[2], data["values"][idx], atol=1e-5, rtol=0)
    _, _, v_only = pol.evaluate_frozen(fr, tokens, first_layer, critic_only=True)
    torch.testing.assert_close(v_only, ref[2], atol=1e-5, rtol=0)


def _trainer(cache: bool):
    pol = _policy()
    cfg = PPOConfig(num_steps=4, minibatch_size=5, update_epochs=2, critic_warmup=1, train_layers=1,
                    target_kl=None, learning_rate=1e-3, cache_frozen_layers=cache, curriculum=False)
    envs = VectorEnv([lambda i=i: make_env(["tabletop/reach_red", "tabletop/place_two"][i % 2], image_size=32,
                                           seed=i) for i in range(3)])
    return PPOTrainer(pol, envs, cfg, seed=0), envs


def test_training_with_the_cache_follows_the_full_forward():
    runs = []
    for cache in (False, True):
        tr, envs = _trainer(cache)
        try:
            stats = [tr.train_iteration() for _ in range(2)]
        finally:
            envs.close()
        runs.append((tr, stats))
    (full, s_full), (cached, s_cached) = runs
    assert cached.first_layer == 2 and full.first_layer is None
    for a, b in zip(s_full, s_cached):
        assert a.pg_loss == pytest.approx(b.pg_loss, abs=1e-5, nan_ok=True)
        assert a.v_loss == pytest.approx(b.v_loss, abs=1e-5)
    for a, b in zip(full.policy.model.parameters(), cached.policy.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert s_cached[1].approx_kl != 0   # the policy really moved


@pytest.mark.parametrize("kw,fix", [({"lora_rank": 4}, "no LoRA"), ({"critic": "separate"}, "critic shared"),
                                    ({"freeze_vision": False}, "freeze-vision"), ({"train_layers": 0}, "train-layers")])
def test_cache_needs_everything_below_frozen(kw, fix):
    with pytest.raises(ValueError, match=fix):
        frozen_layer_cache(_policy(), PPOConfig(cache_frozen_layers=True, **kw))
