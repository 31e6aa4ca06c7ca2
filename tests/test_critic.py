"""Critic options (shared or separate backbone; last-token or mean pooling), and the PPO trainer driving
models other than the built-in one through the policy API alone."""
import numpy as np
import pytest
import torch

from vlarl_fast.config import PPOConfig
from vlarl_fast.envs import VectorEnv, make_env
from vlarl_fast.policy import VLAPolicy, load_policy, make_policy, save_policy
from vlarl_fast.policy.critic import pool_prompt
from vlarl_fast.policy.openvla import build_llama_tokenizer, random_tiny_openvla
from vlarl_fast.rl.trainer import PPOTrainer

INSTR = ["reach the red cube", "put the blue cube on the purple zone and then come back"]


def _tiny(seed=0):
    pol = make_policy("tiny", instructions=INSTR, image_size=32, seed=seed, hidden_size=32, num_layers=2,
                      value_hidden=16)
    for p in pol.model.value_head.parameters():   # a non-zero head, so values differ between inputs
        torch.nn.init.normal_(p, std=0.3)
    return pol


def _obs(B, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (B, size, size, 3), dtype=np.uint8), rng.normal(size=(B, 8)).astype(np.float32),
            [INSTR[i % 2] for i in range(B)])


def test_mean_pooling_ignores_left_padding_even_nan():
    h = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    h[1, 0] = float("nan")
    out = pool_prompt(h, mask, "mean")
    for b in range(3):
        torch.testing.assert_close(out[b], h[b, mask[b].bool()].mean(0))
    torch.testing.assert_close(pool_prompt(h, mask, "last"), h[:, -1])
    with pytest.raises(ValueError, match="pooling"):
        pool_prompt(h, mask, "max")


@pytest.mark.parametrize("kind,pooling", [("shared", "last"), ("shared", "mean"), ("separate", "last"),
                                          ("separate", "mean")])
def test_rollout_values_equal_the_training_forward(kind, pooling):
    pol = _tiny()
    pol.set_critic(kind, pooling)
    if kind == "separate":
        for p in pol.critic.value_head.parameters():
            torch.nn.init.normal_(p, std=0.3)
    images, states, instr = _obs(4)
    out = pol.act(images, states, instr, generator=torch.Generator().manual_seed(0))
    ids, mask = pol.encode_prompts(instr)
    with torch.no_grad():
        _, _, v_train = pol.evaluate_actions(out.vision_feats, torch.as_tensor(states), ids, mask, out.tokens)
        v_warm = pol.evaluate_values(out.vision_feats, torch.as_tensor(states), ids, mask)
    torch.testing.assert_close(v_train, out.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_warm, out.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(pol.value(images, states, instr), out.values, atol=1e-5, rtol=0)
    assert out.values.std() > 1e-4   # the rows really differ, so equality is not trivial


def test_poolings_give_different_values():
    pol = _tiny()
    images, states, instr = _obs(4)
    v_last = pol.value(images, states, instr)
    pol.set_critic("shared", "mean")
    assert not torch.allclose(v_last, pol.value(images, states, instr), atol=1e-4)


def test_separate_critic_starts_at_zero_and_learns_alone():
    pol = _tiny()
    pol.set_critic("separate", "mean")
    images, states, instr = _obs(6)
    assert torch.equal(pol.value(images, states, instr), torch.zeros(6))  # zero-initialised last layer
    policy_before = [p.detach().clone() for p in pol.model.parameters()]
    ids, mask = pol.encode_prompts(instr)
    feats = pol.encode_images(images)
    st = torch.as_tensor(states)
    opt = torch.optim.Adam(pol.value_parameters(), lr=1e-2)
    target = torch.linspace(-1, 1, 6)
    for _ in range(60):
        v = pol.evaluate_values(feats, st, ids, mask)
        loss = ((v - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05
    assert all(torch.equal(a, b) for a, b in zip(policy_before, pol.model.parameters()))
    # its backbone moved away from the policy's
    assert any(not torch.equal(a, b) for a, b in zip(pol.critic.decoder.parameters(), pol.model.decoder.parameters()))


def test_checkpoint_round_trip_keeps_the_critic(tmp_path):
    pol = _tiny()
    pol.set_critic("separate", "mean")
    for p in pol.critic.value_head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    images, states, instr = _obs(3)
    v = pol.value(images, states, instr)
    save_policy(pol, tmp_path / "ck")
    back = load_policy(tmp_path / "ck")
    assert (back.critic_kind, back.value_pooling) == ("separate", "mean")
    torch.testing.assert_close(back.value(images, states, instr), v)
    back.set_critic("separate", "mean")          # asking again keeps the loaded critic
    torch.testing.assert_close(back.value(images, states, instr), v)
    back.set_critic("shared", "last")
    assert back.critic is None
    with pytest.raises(ValueError, match="unknown critic"):
        back.set_critic("twin")


def test_separate_critic_of_a_lora_policy_is_a_plain_merged_copy():
    pytest.importorskip("peft")
    from vlarl_fast.policy.lora import add_lora
    pol = _tiny()
    add_lora(pol.model, rank=2)
    for n, p in pol.model.decoder.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    pol.set_critic("separate", "last")
    assert not any("lora_" in n for n, _ in pol.critic.named_parameters())
    images, states, instr = _obs(2)
    _, (embeds, mask, pos) = pol._prompt(images, states, instr)
    with torch.no_grad():
        h_pol = pol.model.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        h_cri = pol.critic.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    torch.testing.assert_close(h_cri[:, -1], h_pol[:, -1], atol=1e-5, rtol=0)


def _openvla_policy():
    model = random_tiny_openvla(seed=2, value_hidden=16)
    return VLAPolicy(model, build_llama_tokenizer(INSTR), None)


@pytest.mark.parametrize("critic,freeze_vision", [("shared", True), ("separate", False)])
def test_ppo_trainer_drives_an_openvla_policy(critic, freeze_vision):
    """Nothing in the trainer reads the built-in model's own names: OpenVLA (no proprio, other feature shapes)
    goes through critic warm-up and a full update, with the vision tower frozen or not."""
    pol = _openvla_policy()
    size = pol.model.config.image_size
    cfg = PPOConfig(num_steps=3, minibatch_size=6, update_epochs=1, critic_warmup=1, critic=critic,
                    value_pooling="mean", freeze_vision=freeze_vision, train_layers=1, target_kl=None,
                    learning_rate=1e-2)
    envs = VectorEnv([lambda i=i: make_env("tabletop/reach_red", image_size=size, seed=i) for i in range(2)])
    try:
        tr = PPOTrainer(pol, envs, cfg, seed=0)
        lm_top = [p.detach().clone() for p in pol.model.decoder.layers[-1].parameters()]
        vision = [p.detach().clone() for p in pol.model.vision_tower.parameters()]
        s1 = tr.train_iteration()
        assert s1.critic_only and np.isfinite(s1.v_loss)
        assert all(torch.equal(a, b) for a, b in zip(lm_top, pol.model.decoder.layers[-1].parameters()))
        s2 = tr.train_iteration()
        assert not s2.critic_only and np.isfinite(s2.pg_loss) and np.isfinite(s2.approx_kl)
        assert any(not torch.equal(a, b) for a, b in zip(lm_top, pol.model.decoder.layers[-1].parameters()))
        assert all(torch.equal(a, b) for a, b in zip(vision, pol.model.vision_tower.parameters()))
        obs_shape = tuple(tr.buffer.obs.shape[2:])
        assert obs_shape == ((size, size, 3) if not freeze_vision else tuple(pol.encode_images(
            np.zeros((1, size, size, 3), np.uint8)).shape[1:]))
    finally:
        envs.close()


def test_dtype_and_attention_choices_are_explained():
    from vlarl_fast.policy.precision import resolve_attention, resolve_dtype
    assert resolve_dtype("auto", "cpu", pretrained=True) == torch.float32
    assert resolve_dtype("auto", "cuda", pretrained=True) == torch.bfloat16
    assert resolve_dtype("auto", "cuda", pretrained=False) == torch.float32
    with pytest.raises(ValueError, match="tiny VLA trains from scratch in float32"):
        resolve_dtype("bfloat16", "cpu", pretrained=False)
    assert resolve_attention("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_attention("auto", "cuda", torch.float32) == "sdpa"
    assert resolve_attention("eager", "cpu", torch.float32) == "eager"
    with pytest.raises(ValueError, match="flash"):
        resolve_attention("flash_attention_2", "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown attention"):
        resolve_attention("flash3", "cpu", torch.float32)


def test_make_policy_applies_dtype_and_attention(tmp_path):
    pol = make_policy("tiny", instructions=INSTR, image_size=32, hidden_size=32, num_layers=1,
                      attn_implementation="eager")
    assert pol.model.decoder.config._attn_implementation == "eager"
    images, states, instr = _obs(2)
    eager = pol.act(images, states, instr, greedy=True)
    pol.model.decoder.set_attn_implementation("sdpa")
    sdpa = pol.act(images, states, instr, greedy=True)
    torch.testing.assert_close(eager.logprobs, sdpa.logprobs, atol=1e-5, rtol=0)
    save_policy(pol, tmp_path / "ck")
    with pytest.raises(ValueError, match="float32"):
        make_policy(str(tmp_path / "ck"), dtype="bfloat16")
    # a checkpoint in bfloat16 on the CPU when asked (OpenVLA's format)
    from vlarl_fast.policy.openvla import save_openvla
    save_openvla(random_tiny_openvla(seed=3, value_hidden=None), build_llama_tokenizer(INSTR), tmp_path / "ov",
                 norm_stats={"d": {"action": {"q01": [-1] * 7, "q99": [1] * 7, "mask": [True] * 7}}})
    ov = make_policy(str(tmp_path / "ov"), dtype="bfloat16")
    assert ov.model.lm_head_weight.dtype == torch.bfloat16
    out = ov.act(_obs(2, size=ov.model.config.image_size)[0], None, instr, greedy=True)
    assert out.logprobs.dtype == torch.float32 and torch.isfinite(out.logprobs).all()
