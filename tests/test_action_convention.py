"""Action conventions: OpenVLA's LIBERO fine-tunes emit the gripper as 0 = close, 1 = open, LIBERO takes
-1 = open, +1 = close. The convention follows the checkpoint's statistics key, is applied where decoded actions
become env actions, undone where demonstrations become tokens, and recorded with the policy when saved."""
import json
import shutil

import numpy as np
import pytest
import torch

from vlarl_fast.policy import CheckpointError, load_policy, make_policy, save_policy
from vlarl_fast.policy.action_convention import (ActionConventionError, from_env, infer_convention,
                                                 resolve_convention, to_env)
from vlarl_fast.policy.openvla import (OpenVLACheckpointError, build_llama_tokenizer, random_tiny_openvla,
                                       save_openvla)

INSTR = ["pick up the black bowl and place it on the plate", "open the top drawer"]
LIBERO = "libero_spatial_no_noops"
BRIDGE = "bridge_orig"
# OpenVLA's LIBERO statistics: deltas normalised, the gripper (mask False) left as stored, in [0, 1]
STATS = {"action": {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Tiny OpenVLA checkpoints as a release ships them (no recorded convention): LIBERO and Bridge statistics."""
    model = random_tiny_openvla(seed=3, value_hidden=None)
    tok = build_llama_tokenizer(INSTR)
    root = tmp_path_factory.mktemp("released")
    for key in (LIBERO, BRIDGE):
        save_openvla(model, tok, root / key, norm_stats={key: STATS})
    return root


def _images(B, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (B, 28, 28, 3), dtype=np.uint8)


def _gripper_tokens(policy):
    """Action tokens [2, 7] whose gripper decodes to 0 (OpenVLA: close) in row 0 and to 1 (open) in row 1: the
    bin centres nearest 0 and 1 (the last centre is 1 - 1/255)."""
    norm = np.array([[0.2] * 6 + [0.0], [-0.2] * 6 + [1.0]])
    tokens = torch.as_tensor(policy.action_tokenizer.encode(norm))
    decoded = policy.action_tokenizer.decode(tokens.numpy())[:, 6]
    assert abs(decoded[0]) < 1e-6 and abs(decoded[1] - 1.0) < 0.005
    return tokens, decoded


def test_libero_openvla_is_openvlas_gripper_mapping():
    a = np.array([[0.1, -0.2, 0.3, 0.0, 0.0, 0.5, g] for g in (0.0, 1.0, 0.25, 0.9, 0.5)], np.float32)
    got = to_env(a, "libero-openvla")
    # normalize_gripper_action(binarize=True) then invert_gripper_action: 0 -> +1 (close), 1 -> -1 (open)
    np.testing.assert_array_equal(got[:, 6], [1.0, -1.0, 1.0, -1.0, 0.0])
    np.testing.assert_array_equal(got[:, :6], a[:, :6])
    torch.testing.assert_close(to_env(torch.from_numpy(a), "libero-openvla"), torch.from_numpy(got))
    assert to_env(a, "identity") is a


def test_from_env_undoes_to_env_on_libero_commands():
    e = np.array([[0.3, 0.0, -0.1, 0.0, 0.2, 0.0, g] for g in (1.0, -1.0, 0.0, 0.4, -0.7)], np.float32)
    policy_side = from_env(e, "libero-openvla")
    np.testing.assert_array_equal(policy_side[:3, 6], [0.0, 1.0, 0.5])   # close -> 0, open -> 1
    back = to_env(policy_side, "libero-openvla")
    np.testing.assert_array_equal(back[:, 6], [1.0, -1.0, 0.0, 1.0, -1.0])   # exact on {-1, 0, 1}, else the sign
    np.testing.assert_array_equal(back[:, :6], e[:, :6])


def test_the_statistics_key_chooses_the_convention(released):
    assert [infer_convention(k) for k in (LIBERO, "libero_10_no_noops", "libero", BRIDGE, "fractal20220817_data",
                                          None)] == ["libero-openvla"] * 3 + ["identity"] * 3
    assert load_policy(released / LIBERO).action_convention == "libero-openvla"
    assert load_policy(released / BRIDGE).action_convention == "identity"
    # the tabletop suite's own policy keeps acting as before
    assert make_policy("tiny", instructions=INSTR, hidden_size=32, num_layers=1).action_convention == "identity"


def test_a_libero_checkpoint_closes_on_0_and_opens_on_1(released):
    policy = load_policy(released / LIBERO)
    tokens, decoded = _gripper_tokens(policy)
    actions = policy.actions_from_tokens(tokens).numpy()
    np.testing.assert_array_equal(actions[:, 6], [1.0, -1.0])
    norm = policy.action_tokenizer.decode(tokens.numpy())
    np.testing.assert_allclose(actions[:, :6], norm[:, :6] * 0.5, atol=1e-6)   # q01/q99 = -0.5/0.5
    # the same tokens under Bridge statistics: the decoded gripper as it is
    bridge = load_policy(released / BRIDGE)
    np.testing.assert_allclose(bridge.actions_from_tokens(tokens).numpy()[:, 6], decoded, atol=1e-6)
    # act() goes through the same mapping: every gripper command is LIBERO's -1 / +1 (no bin centre is 0.5)
    out = policy.act(_images(4), None, [INSTR[i % 2] for i in range(4)], greedy=True)
    g = policy.action_tokenizer.decode(out.tokens.numpy())[:, 6]
    np.testing.assert_array_equal(out.actions[:, 6], -np.sign(2.0 * g - 1.0))
    assert set(np.abs(out.actions[:, 6]).tolist()) == {1.0}
    np.testing.assert_array_equal(out.actions, policy.actions_from_tokens(out.tokens).numpy())


def test_libero_expert_actions_become_the_tokens_that_decode_back_to_them(released):
    policy = load_policy(released / LIBERO)
    expert = np.array([[0.25, -0.1, 0.0, 0.05, -0.3, 0.1, 1.0],     # close
                       [-0.4, 0.2, 0.3, 0.0, 0.0, -0.05, -1.0]],   # open
                      np.float32)
    tokens = policy.tokens_from_actions(expert)
    # in OpenVLA's own data convention: close is 0, open is 1
    np.testing.assert_allclose(policy.action_tokenizer.decode(tokens.cpu().numpy())[:, 6], [0.0, 1.0], atol=0.005)
    back = policy.actions_from_tokens(tokens).numpy()
    np.testing.assert_array_equal(back[:, 6], expert[:, 6])
    np.testing.assert_allclose(back[:, :6], expert[:, :6], atol=1.0 / 255 + 1e-6)   # within one bin


def test_saving_and_loading_keeps_the_convention(released, tmp_path):
    policy = load_policy(released / LIBERO)
    obs = (_images(3, seed=1), None, [INSTR[i % 2] for i in range(3)])
    out = policy.act(*obs, greedy=True)
    save_policy(policy, tmp_path / "libero")
    assert json.loads((tmp_path / "libero" / "config.json").read_text())["vlarl_action_convention"] == "libero-openvla"
    again = load_policy(tmp_path / "libero")
    assert again.action_convention == "libero-openvla"
    np.testing.assert_array_equal(again.act(*obs, greedy=True).actions, out.actions)   # applied once, not twice

    # a convention chosen by hand is recorded and beats what the statistics key implies
    raw = load_policy(released / LIBERO, action_convention="identity")
    save_policy(raw, tmp_path / "raw")
    kept = load_policy(tmp_path / "raw")
    assert kept.action_convention == "identity" and kept.unnorm_key == LIBERO
    np.testing.assert_allclose(kept.act(*obs, greedy=True).actions[:, 6],
                               kept.action_tokenizer.decode(out.tokens.numpy())[:, 6], atol=1e-6)
    # and an explicit choice at load time beats the recorded one
    assert load_policy(tmp_path / "libero", action_convention="identity").action_convention == "identity"


def test_vlarl_checkpoints_record_their_convention(tmp_path):
    policy = make_policy("tiny", instructions=INSTR, hidden_size=32, num_layers=1, action_convention="libero-openvla")
    save_policy(policy, tmp_path / "tiny")
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["action_convention"] == "libero-openvla"
    assert load_policy(tmp_path / "tiny").action_convention == "libero-openvla"
    plain = make_policy("tiny", instructions=INSTR, hidden_size=32, num_layers=1)
    save_policy(plain, tmp_path / "plain")
    assert load_policy(tmp_path / "plain").action_convention == "identity"


def test_bad_conventions_are_explained(released, tmp_path):
    with pytest.raises(CheckpointError, match="unknown action convention 'openvla'; use one of auto, identity, "
                                              "libero-openvla"):
        make_policy("tiny", instructions=INSTR, hidden_size=32, num_layers=1, action_convention="openvla")
    with pytest.raises(OpenVLACheckpointError, match="unknown action convention 'flip'"):
        load_policy(released / LIBERO, action_convention="flip")
    with pytest.raises(ActionConventionError, match="use one of identity, libero-openvla"):
        resolve_convention("auto", recorded="auto", unnorm_key=None)
    shutil.copytree(released / LIBERO, tmp_path / "odd")
    cfg = json.loads((tmp_path / "odd" / "config.json").read_text())
    (tmp_path / "odd" / "config.json").write_text(json.dumps(cfg | {"vlarl_action_convention": "flipped"}))
    with pytest.raises(OpenVLACheckpointError, match="records 'flipped' under vlarl_action_convention"):
        load_policy(tmp_path / "odd")
