"""OpenVLA behind the policy API: the shared model protocol, left-padded prompt embeddings against OpenVLA's own
multimodal layout, the value head, and OpenVLA checkpoint directories through load_policy / make_policy /
save_policy."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlarl_fast.policy import CheckpointError, NormStats, TinyVLA, VLAConfig, load_policy, make_policy, save_policy
from vlarl_fast.policy.openvla import (OpenVLACheckpointError, build_llama_tokenizer, load_openvla,
                                       random_tiny_openvla, save_openvla)
from vlarl_fast.policy.protocol import VLAModel, check_model, left_pad

INSTR = ["pick up the black bowl and place it on the plate", "open the top drawer"]


def _stats(lo, hi):
    return {"action": {"q01": [lo] * 7, "q99": [hi] * 7, "mask": [True] * 6 + [False]}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_tiny_openvla(seed=1, value_hidden=None)
    path = tmp_path_factory.mktemp("openvla") / "tiny"
    save_openvla(model, build_llama_tokenizer(INSTR), path,
                 norm_stats={"libero_spatial": _stats(-0.5, 0.5), "libero_goal": _stats(0.0, 2.0)})
    return model, path


def _images(B, seed=0, size=28):
    return np.random.default_rng(seed).integers(0, 256, (B, size, size, 3), dtype=np.uint8)


def test_both_models_implement_the_protocol():
    tiny = TinyVLA(VLAConfig(hidden_size=32, num_layers=1))
    openvla = random_tiny_openvla()
    for m in (tiny, openvla):
        assert isinstance(m, VLAModel)
        check_model(m)
    assert (tiny.vocab_start, tiny.vocab_end) == (384, 640)
    # OpenVLA's bins end at the 640-id base vocabulary, below the padded 704-row head
    assert (openvla.vocab_start, openvla.vocab_end, openvla.lm_head_weight.shape[0]) == (384, 640, 704)
    with pytest.raises(TypeError, match="missing .*prompt_embeds"):
        check_model(torch.nn.Linear(2, 2))


def test_prompt_embeds_match_openvlas_multimodal_layout():
    model = random_tiny_openvla(seed=2)
    tok = build_llama_tokenizer(INSTR)
    rows = [model.prompt_ids(tok, s) for s in INSTR]
    assert len(rows[0]) != len(rows[1])
    pv = model.preprocess_images(torch.from_numpy(_images(2)))
    feats = model.encode_images(pv)
    ids, mask = left_pad(rows, pad_id=tok.pad_token_id)
    with torch.no_grad():
        embeds, emask, pos = model.prompt_embeds(feats, None, ids, mask)
        for i, r in enumerate(rows):
            want, _ = model.multimodal_inputs(torch.tensor([r]), None, vision_features=feats[i:i + 1])
            n = want.shape[1]
            assert int(emask[i].sum()) == n and bool(emask[i, -n:].all())
            torch.testing.assert_close(embeds[i, -n:], want[0], rtol=0, atol=0)
            assert pos[i, -n:].tolist() == list(range(n))
            # and the logits at the last column are those of OpenVLA's forward on the unpadded prompt
            ref = model(torch.tensor([r]), vision_features=feats[i:i + 1]).logits[0, -1]
            h = model.decoder(inputs_embeds=embeds, attention_mask=emask, position_ids=pos).last_hidden_state
            torch.testing.assert_close(h[i, -1] @ model.lm_head_weight.T, ref, rtol=1e-5, atol=1e-5)


def test_value_head_starts_at_zero_and_reads_the_last_prompt_token():
    tiny = TinyVLA(VLAConfig(hidden_size=32, num_layers=1))  # its critic is built the same way
    assert tiny.value_head[-1].weight.abs().sum() == 0
    model = random_tiny_openvla(seed=3, value_hidden=None)
    with pytest.raises(ValueError, match="no value head: call model.add_value_head"):
        model.value_from_hidden(torch.zeros(1, 64))
    head = model.add_value_head(16, detach=True)
    assert head[-1].weight.abs().sum() == 0 and head[-1].bias.abs().sum() == 0
    h = torch.randn(3, 64, requires_grad=True)
    v = model.value_from_hidden(h)
    assert v.shape == (3,) and v.dtype == torch.float32 and torch.equal(v, torch.zeros(3))
    with torch.no_grad():
        head[-1].bias.fill_(1.0)
    v = model.value_from_hidden(h)
    v.sum().backward()
    assert h.grad is None  # detached: the critic does not train the backbone
    assert head[-1].bias.grad is not None


def test_load_policy_routes_openvla_checkpoints(ckpt, tmp_path):
    model, path = ckpt
    with pytest.raises(OpenVLACheckpointError, match="choose one with unnorm_key, one of: libero_goal, libero_spatial"):
        load_policy(path)
    with pytest.raises(OpenVLACheckpointError, match="available: libero_goal, libero_spatial"):
        make_policy(str(path), unnorm_key="bridge_orig")
    policy = make_policy(str(path), unnorm_key="libero_goal")
    assert policy.unnorm_key == "libero_goal" and policy.norm_stats.q99 == [2.0] * 7
    assert policy.action_tokenizer.vocab_size == 640 and policy.model.value_head is not None
    out = policy.act(_images(3), None, [INSTR[0], INSTR[1], INSTR[0]], greedy=True)
    assert torch.equal(out.values, torch.zeros(3))  # a fresh critic
    # un-normalised with libero_goal's q01/q99 = 0/2; the gripper (not normalised) in OpenVLA's LIBERO convention,
    # 0 = close and 1 = open, becomes LIBERO's +1 / -1
    assert policy.action_convention == "libero-openvla"
    norm = policy.action_tokenizer.decode(out.tokens.numpy())
    np.testing.assert_allclose(out.actions[:, :6], (norm[:, :6] + 1.0), atol=1e-6)
    np.testing.assert_array_equal(out.actions[:, 6], -np.sign(2.0 * norm[:, 6] - 1.0))
    assert torch.equal(policy.model.lm_head_weight, model.lm_head_weight)

    # save_policy writes OpenVLA's layout again, with the trained critic beside it
    with torch.no_grad():
        policy.model.value_head[-1].bias.fill_(0.25)
    save_policy(policy, tmp_path / "again", extra={"stage": "rl"})
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["model_type"] == "openvla" and cfg["vlarl_extra"] == {"stage": "rl"}
    assert sorted(json.loads((tmp_path / "again" / "dataset_statistics.json").read_text())) == ["libero_goal"]
    again = load_policy(tmp_path / "again")
    assert again.unnorm_key == "libero_goal" and again.action_convention == "libero-openvla"
    b = again.act(_images(3), None, [INSTR[0], INSTR[1], INSTR[0]], greedy=True)
    assert torch.equal(b.tokens, out.tokens)
    np.testing.assert_array_equal(b.actions, out.actions)
    torch.testing.assert_close(b.values, torch.full((3,), 0.25))
    # the value head stays out of OpenVLA's own tensors, in a file of its own
    assert not any("value" in k for k in load_file(str(tmp_path / "again" / "model.safetensors")))
    assert sorted(load_file(str(tmp_path / "again" / "vlarl_value_head.safetensors"))) == \
        ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert load_openvla(tmp_path / "again").model.value_head is not None


def test_unnorm_key_is_only_for_openvla(tmp_path):
    with pytest.raises(CheckpointError, match="needs an OpenVLA checkpoint"):
        make_policy("tiny", unnorm_key="libero_goal")
    policy = make_policy("tiny", instructions=INSTR, hidden_size=32, num_layers=1)
    policy.norm_stats = NormStats.from_actions(np.random.default_rng(0).uniform(-1, 1, (20, 7)))
    save_policy(policy, tmp_path / "tiny")
    with pytest.raises(CheckpointError, match="is for OpenVLA checkpoints"):
        load_policy(tmp_path / "tiny", unnorm_key="libero_goal")


def test_bad_images_are_explained(ckpt):
    policy = load_policy(ckpt[1], unnorm_key="libero_spatial")
    with pytest.raises(ValueError, match="uint8"):
        policy.act(_images(1).astype(np.float32), None, INSTR[:1])
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        policy.act(np.zeros((1, 3, 28, 28), np.uint8), None, INSTR[:1])
