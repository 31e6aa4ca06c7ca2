"""Native transformers image-text-to-text models (LLaVA, PaliGemma) as policy backbones, tiny random configs:
the model API, rollout log-probs equal to the training forward, greedy decoding equal to `generate`, a PPO-style
gradient step, and the checkpoint round trip."""
import numpy as np
import pytest
import torch
from transformers import (CLIPVisionConfig, GemmaConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig)

from vlarl_fast.policy import NormStats, VLAPolicy, load_policy, save_policy
from vlarl_fast.policy.decode import decode_actions
from vlarl_fast.policy.hf_vlm import HFVLAModel, is_hf_vlm_checkpoint
from vlarl_fast.policy.protocol import check_model
from vlarl_fast.policy.text_tokenizer import build_tokenizer

INSTR = ["move the gripper to the red cube", "pick up the green cube and put it on the plate"]
TEXT_VOCAB = 384
VOCAB = TEXT_VOCAB + 256


def _llava():
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0),
        image_token_index=VOCAB - 1, vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg)


def _paligemma():
    cfg = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8),
        text_config=GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, pad_token_id=0),
        image_token_index=VOCAB - 1, projection_dim=32)
    return PaliGemmaForConditionalGeneration(cfg)


BACKBONES = {"llava": _llava, "paligemma": _paligemma}


def _policy(kind):
    torch.manual_seed(0)
    model = HFVLAModel(BACKBONES[kind](), value_hidden=16)
    with torch.no_grad():   # a critic that says something, so the value round trip means something
        model.value_head[-1].weight.normal_()
    tok = build_tokenizer(INSTR, text_vocab_size=TEXT_VOCAB)
    return VLAPolicy(model, tok, NormStats(q01=[-0.5] * 7, q99=[0.5] * 7))


def _obs(B, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (B, 32, 32, 3), dtype=np.uint8), rng.normal(size=(B, 8)).astype(np.float32)


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_backbone_implements_the_policy_api(kind):
    policy = _policy(kind)
    model = policy.model
    check_model(model)
    assert (model.vocab_start, model.vocab_end) == (TEXT_VOCAB, VOCAB)
    assert model.config.num_image_tokens == 16 and model.config.feature_dim == 32
    imgs, st = _obs(3)
    instr = [INSTR[i % 2] for i in range(3)]   # two prompt lengths: left padding in play
    out = policy.act(imgs, st, instr, temperature=1.2, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (3, 7) and out.actions.shape == (3, 7)
    assert out.tokens.min() >= TEXT_VOCAB and np.abs(out.actions[:, :6]).max() <= 0.5 + 1e-6
    ids, mask = policy.encode_prompts(instr)
    assert (mask == 0).any()
    with torch.no_grad():
        lp, _, v = policy.evaluate_actions(out.vision_feats, None, ids, mask, out.tokens, temperature=1.2)
    torch.testing.assert_close(lp, out.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(v, out.values, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expects 32x32"):
        model.preprocess_images(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))


def _greedy_without_cache(model, embeds, mask, pos):
    """The readable reference: re-run the whole sequence for every token, argmax over the action rows."""
    tokens = []
    for _ in range(7):
        h = model.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
        t = (h @ model.lm_head_weight[model.vocab_start:model.vocab_end].T).argmax(-1) + model.vocab_start
        tokens.append(t)
        embeds = torch.cat([embeds, model.embed_tokens(t)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_greedy_decoding_equals_the_references(kind):
    policy = _policy(kind)
    model = policy.model.eval()
    imgs, st = _obs(2, seed=1)
    ids, mask = policy.encode_prompts(INSTR)
    with torch.no_grad():
        feats = policy.encode_images(imgs)
        embeds, emask, pos = model.prompt_embeds(feats, None, ids, mask)
        got = decode_actions(model, embeds, emask, pos, greedy=True).tokens
        assert torch.equal(got, _greedy_without_cache(model, embeds, emask, pos))
        if kind == "llava":   # PaliGemma's generate() takes no inputs_embeds
            bad = [[i] for i in range(VOCAB) if not TEXT_VOCAB <= i < VOCAB]
            want = model.vlm.generate(inputs_embeds=embeds, attention_mask=emask, max_new_tokens=7, do_sample=False,
                                      bad_words_ids=bad, pad_token_id=0)
            assert torch.equal(got, want[:, -7:])


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_gradient_step_and_checkpoint_round_trip(kind, tmp_path):
    policy = _policy(kind)
    model = policy.model
    imgs, st = _obs(4, seed=2)
    instr = [INSTR[i % 2] for i in range(4)]
    out = policy.act(imgs, st, instr, generator=torch.Generator().manual_seed(1))
    ids, mask = policy.encode_prompts(instr)
    model.train()
    lp, _, _ = policy.evaluate_actions(policy.encode_images(imgs), None, ids, mask, out.tokens)
    (-lp.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any("language_model" in n for n in grads) and any("vision_tower" in n for n in grads)
    model.eval()

    policy.action_convention = "libero-openvla"   # recorded among the settings, so the reloaded policy acts alike
    save_policy(policy, tmp_path / "ckpt")
    assert is_hf_vlm_checkpoint(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt")
    assert isinstance(loaded.model, HFVLAModel) and loaded.norm_stats.q99 == [0.5] * 7
    assert loaded.action_convention == "libero-openvla"
    with torch.no_grad():
        a = policy.evaluate_actions(policy.encode_images(imgs), None, ids, mask, out.tokens)
        b = loaded.evaluate_actions(loaded.encode_images(imgs), None, *loaded.encode_prompts(instr), out.tokens)
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(b[2], a[2], atol=1e-5, rtol=0)


def test_unsupported_model_is_explained():
    with pytest.raises(TypeError, match="not a supported image-text-to-text model"):
        HFVLAModel(torch.nn.Linear(2, 2))
