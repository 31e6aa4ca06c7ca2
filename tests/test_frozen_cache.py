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
    assert fr.hidden.shape[1] == buf.frozen[0][0][1].hidden.shape[1] > buf.frozen[1][0][1].hidden.shape[1]
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


def test_frozen_rows_of_a_step_decoded_in_batches_equal_those_of_one_batch():
    """A pipelined or group rollout decodes a step's envs in several batches, each padded to its own longest
    prompt: the rows of every batch come back, re-padded together."""
    pol = _policy()
    instr = [INSTR[0], INSTR[1], INSTR[2], INSTR[0], INSTR[2]]
    images, states, ins = _obs(5, 0, instr)
    whole, parts = RolloutBuffer(1, 5), RolloutBuffer(1, 5)
    g = torch.Generator().manual_seed(0)
    out = pol.act(images, states, ins, greedy=True, generator=g, capture_layer=1)
    whole.add(0, out.vision_feats, torch.as_tensor(states), out.tokens, out.logprobs, out.values, ins, out.frozen)
    for ids in ([3, 1], [0, 4, 2]):   # the long instruction (env 1) in the first batch only
        o = pol.act(images[ids], states[ids], [ins[i] for i in ids], greedy=True, generator=g, capture_layer=1)
        parts.add(0, o.vision_feats, torch.as_tensor(states[ids]), o.tokens, o.logprobs, o.values,
                  [ins[i] for i in ids], o.frozen, ids=np.array(ids))
    idx = np.array([4, 1, 0, 3, 2])
    a, b = whole.frozen_rows(idx), parts.frozen_rows(idx)
    torch.testing.assert_close(a.mask, b.mask, atol=0, rtol=0)
    torch.testing.assert_close(a.pos, b.pos, atol=0, rtol=0)
    keep = a.mask.bool()
    torch.testing.assert_close(a.hidden[keep], b.hidden[keep], atol=1e-5, rtol=0)
    parts.start(1)
    with pytest.raises(RuntimeError, match="no frozen-layer inputs"):
        parts.frozen_rows(idx)


def _trainer(cache: bool, rollout: str = "sync", algo: str = "ppo"):
    pol = _policy()
    cfg = PPOConfig(num_steps=4, minibatch_size=5, update_epochs=2, critic_warmup=1, train_layers=1,
                    target_kl=None, learning_rate=1e-3, cache_frozen_layers=cache, curriculum=False,
                    rollout=rollout, algo=algo, group_size=2, filter_groups=False)
    tasks = ["tabletop/reach_red", "tabletop/place_two"]
    if algo == "ppo":
        slot_task, options = [tasks[i % 2] for i in range(3)], None
    else:   # 2 groups of 2 slots, each group from one fixed state of its task
        from vlarl_fast.rl.groups import GroupSchedule, group_slot_tasks
        slot_task = group_slot_tasks(tasks, 4, 2)
        options = GroupSchedule(slot_task, 2, lambda task: 3)
    # group slots end their episodes at different steps, so later steps decode only the envs still running
    limit = (lambda i: None) if algo == "ppo" else (lambda i: 3 + i)
    envs = VectorEnv([lambda t=t, i=i: make_env(t, image_size=32, seed=i, max_episode_steps=limit(i))
                      for i, t in enumerate(slot_task)], backend="inprocess", reset_options=options)
    return PPOTrainer(pol, envs, cfg, seed=0), envs


@pytest.mark.parametrize("rollout,algo", [("sync", "ppo"), ("pipelined", "ppo"), ("sync", "grpo")])
def test_training_with_the_cache_follows_the_full_forward(rollout, algo):
    """Pipelined and group rollouts decode each step's envs in several batches: the cache follows them."""
    runs = []
    for cache in (False, True):
        tr, envs = _trainer(cache, rollout, algo)
        try:
            stats = [tr.train_iteration() for _ in range(2)]
        finally:
            envs.close()
        runs.append((tr, stats))
    (full, s_full), (cached, s_cached) = runs
    assert cached.first_layer == 2 and full.first_layer is None
    for a, b in zip(s_full, s_cached):
        assert a.pg_loss == pytest.approx(b.pg_loss, abs=1e-5, nan_ok=True)
        assert a.v_loss == pytest.approx(b.v_loss, abs=1e-5, nan_ok=True)
    for a, b in zip(full.policy.model.parameters(), cached.policy.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert s_cached[1].approx_kl != 0   # the policy really moved


@pytest.mark.parametrize("kw,fix", [({"lora_rank": 4}, "no LoRA"), ({"critic": "separate"}, "critic shared"),
                                    ({"freeze_vision": False}, "freeze-vision"), ({"train_layers": 0}, "train-layers")])
def test_cache_needs_everything_below_frozen(kw, fix):
    for on in (True, "on"):
        with pytest.raises(ValueError, match=fix):
            frozen_layer_cache(_policy(), PPOConfig(cache_frozen_layers=on, **kw))
    # 'auto' (the default) falls back to the whole model where the cache does not apply
    assert frozen_layer_cache(_policy(), PPOConfig(**kw)) is None


def test_cache_auto_starts_at_the_first_trained_layer():
    assert frozen_layer_cache(_policy(), PPOConfig()) == 2   # 3 layers, the top one trained
    assert frozen_layer_cache(_policy(), PPOConfig(train_layers=2)) == 1
    for off in (False, "off"):
        assert frozen_layer_cache(_policy(), PPOConfig(cache_frozen_layers=off)) is None
    with pytest.raises(ValueError, match="use auto, on or off"):
        frozen_layer_cache(_policy(), PPOConfig(cache_frozen_layers="yes"))


@pytest.mark.parametrize("kv_heads,first_layer,keep", [(4, 2, 7), (2, 1, 7), (1, 2, 1), (2, 0, 13), (4, 2, 3)])
def test_top_layers_tail_equals_the_last_columns_of_the_full_top_layers(kv_heads, first_layer, keep):
    """The fast path of the cached update against its reference, forward and gradients, over grouped-query
    attention, several layers above the cache and left padding of different lengths (L = 13)."""
    from transformers import LlamaConfig, LlamaModel

    from vlarl_fast.policy.decode import top_layers_hidden, top_layers_tail
    torch.manual_seed(0)
    dec = LlamaModel(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=56, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=kv_heads, attn_implementation="sdpa"))
    B, L = 3, 13
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :4], mask[2, :1] = 0, 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    x = torch.randn(B, L, 32) * mask[..., None]
    grads = []
    for fn in (lambda: top_layers_hidden(dec, x, mask, pos, first_layer)[:, -keep:],
               lambda: top_layers_tail(dec, x, mask, pos, first_layer, keep)):
        dec.zero_grad()
        out = fn()
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}))
    (ref, g_ref), (fast, g_fast) = grads
    valid = mask[:, -keep:].bool()
    torch.testing.assert_close(fast[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert g_ref.keys() == g_fast.keys() and len(g_ref) > 0
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], atol=1e-5, rtol=1e-4, msg=n)
