"""LoRA through peft: adapters on the language model, save -> load -> merge round trips in both
checkpoint formats, and the adapters as the only trainable part of the language model in PPO."""
import numpy as np
import pytest
import torch

from vlarl_fast.policy import NormStats, load_policy, make_policy, save_policy
from vlarl_fast.policy.lora import ADAPTER_CONFIG, add_lora, base_state_dict, has_lora, merge_lora
from vlarl_fast.policy.openvla import build_llama_tokenizer, random_tiny_openvla

INSTR = ["move the gripper to the red cube", "pick up the green cube"]


def _tiny_policy(seed=0):
    p = make_policy("tiny", instructions=INSTR, seed=seed, hidden_size=32, num_layers=2)
    p.norm_stats = NormStats.from_actions(np.random.default_rng(0).uniform(-1, 1, (32, 7)).astype(np.float32))
    return p


def _logprobs(policy, seed=0, size=64):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 255, (3, size, size, 3), dtype=np.uint8)
    states = rng.normal(size=(3, 8)).astype(np.float32)
    vs = policy.model.vocab_start
    tokens = torch.as_tensor(rng.integers(vs, vs + 256, (3, 7)))
    instr = [INSTR[i % 2] for i in range(3)]
    with torch.no_grad():
        policy.model.eval()
        feats = policy.encode_images(imgs)
        ids, mask = policy.encode_prompts(instr)
        st = torch.as_tensor(states) if getattr(policy.config, "use_state", False) else None
        lp, _, _ = policy.evaluate_actions(feats, st, ids, mask, tokens)
    return lp


def _perturb_adapters(model, seed=0):
    """peft starts B at zero (the adapted model equals the base); move it so the round trip means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_tiny_policy_lora_save_load_merge_round_trip(tmp_path):
    policy = _tiny_policy()
    base = _logprobs(policy)
    names = add_lora(policy.model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    assert len(names) == 2 * 3 and has_lora(policy.model)
    torch.testing.assert_close(_logprobs(policy), base)   # B = 0: nothing changes yet
    _perturb_adapters(policy.model)
    adapted = _logprobs(policy)
    assert (adapted - base).abs().max() > 1e-3
    # only the adapters of the language model are trainable inside it
    trainable = [n for n, p in policy.model.decoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    save_policy(policy, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / ADAPTER_CONFIG).is_file()
    loaded = load_policy(tmp_path / "ckpt")
    assert has_lora(loaded.model)
    torch.testing.assert_close(_logprobs(loaded), adapted, atol=1e-5, rtol=0)

    assert merge_lora(loaded.model) == 6 and not has_lora(loaded.model)
    torch.testing.assert_close(_logprobs(loaded), adapted, atol=1e-4, rtol=0)
    save_policy(loaded, tmp_path / "merged")
    assert not (tmp_path / "merged" / ADAPTER_CONFIG).exists()
    torch.testing.assert_close(_logprobs(load_policy(tmp_path / "merged")), adapted, atol=1e-4, rtol=0)


def test_openvla_checkpoint_lora_round_trip(tmp_path):
    from vlarl_fast.policy import VLAPolicy
    from vlarl_fast.policy.openvla import load_openvla, save_openvla
    model = random_tiny_openvla(seed=3)
    tok = build_llama_tokenizer(INSTR)
    stats = {"libero_goal": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}}
    add_lora(model, rank=2, alpha=4)
    _perturb_adapters(model, seed=1)
    policy = VLAPolicy(model, tok, NormStats(q01=[-1.0] * 7, q99=[1.0] * 7))
    size = model.config.image_size
    want = _logprobs(policy, size=size)
    save_openvla(model, tok, tmp_path / "ovla", norm_stats=stats)
    # OpenVLA's own tensors keep OpenVLA's names: no peft suffixes leak into the shards
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "ovla" / "model.safetensors")).keys()
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    b = load_openvla(tmp_path / "ovla", unnorm_key="libero_goal")
    got = _logprobs(VLAPolicy(b.model, b.tokenizer, b.norm_stats), size=size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_base_state_dict_and_bad_input():
    sd = {"a.q_proj.base_layer.weight": 1, "a.q_proj.lora_A.default.weight": 2, "b.weight": 3}
    assert base_state_dict(sd) == {"a.q_proj.weight": 1, "b.weight": 3}
    policy = _tiny_policy()
    with pytest.raises(ValueError, match="not linear layers"):
        add_lora(policy.model, targets=("qkv",))
    with pytest.raises(ValueError, match="rank must be"):
        add_lora(policy.model, rank=0)
    add_lora(policy.model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(policy.model, rank=2)


def test_rollout_logprobs_with_adapters_equal_the_training_forward():
    # the fast decoding path must run the adapters too (peft's layers are not plain nn.Linear), or every
    # PPO ratio of a LoRA run would compare two different policies
    policy = _tiny_policy()
    add_lora(policy.model, rank=4, alpha=8)
    _perturb_adapters(policy.model)
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    states = rng.normal(size=(5, 8)).astype(np.float32)
    instr = [INSTR[i % 2] for i in range(5)]
    out = policy.act(imgs, states, instr, temperature=1.3, generator=torch.Generator().manual_seed(0))
    ids, mask = policy.encode_prompts(instr)
    with torch.no_grad():
        lp, _, _ = policy.evaluate_actions(out.vision_feats, torch.as_tensor(states), ids, mask, out.tokens,
                                           temperature=1.3)
    torch.testing.assert_close(lp, out.logprobs, atol=1e-5, rtol=0)
