import numpy as np
import pytest
import torch

from vlarl_fast.policy import ActionTokenizer, CheckpointError, NormStats, load_policy, make_policy, save_policy

INSTR = ["move the gripper to the red cube", "push the green cube into the yellow zone"]


def test_action_tokenizer_openvla_layout_and_round_trip():
    tok = ActionTokenizer(vocab_size=640)
    assert tok.vocab_start == 384
    ids = tok.encode(np.array([-1.0, 0.0, 1.0]))
    assert ids.min() >= 384 and ids.max() <= 639
    assert ids[2] == 640 - 256  # +1 -> last bin -> first action id
    x = np.random.default_rng(0).uniform(-1, 1, size=(100, 7))
    back = tok.decode(tok.encode(x))
    assert np.abs(back - x).max() <= 2.0 / 255 + 1e-6  # within one bin
    assert torch.equal(tok.decode_torch(torch.as_tensor(tok.encode(x))), torch.as_tensor(back))


def test_norm_stats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.5, 0.5, size=(200, 7)).astype(np.float32)
    actions[:, 6] = rng.choice([-1.0, 1.0], size=200)
    s = NormStats.from_actions(actions)
    norm = s.normalize(actions)
    assert norm.min() >= -1 and norm.max() <= 1
    np.testing.assert_array_equal(norm[:, 6], actions[:, 6])  # gripper passes through
    inside = (actions[:, :6] > np.array(s.q01)[:6]) & (actions[:, :6] < np.array(s.q99)[:6])
    np.testing.assert_allclose(s.unnormalize(norm)[:, :6][inside], actions[:, :6][inside], atol=1e-5)
    s.save(tmp_path / "dataset_statistics.json")
    assert NormStats.load(tmp_path / "dataset_statistics.json").q99 == s.q99


@pytest.fixture(scope="module")
def policy():
    p = make_policy("tiny", instructions=INSTR, seed=0, hidden_size=32, num_layers=2)
    p.model.eval()
    return p


def _obs(B, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (B, 64, 64, 3), dtype=np.uint8), rng.normal(size=(B, 8)).astype(np.float32)


def test_rollout_logprobs_equal_training_forward(policy):
    imgs, st = _obs(5)
    instr = [INSTR[i % 2] for i in range(5)]  # different prompt lengths -> left padding
    out = policy.act(imgs, st, instr, temperature=1.3, generator=torch.Generator().manual_seed(0))
    ids, mask = policy.encode_prompts(instr)
    assert (mask == 0).any()
    with torch.no_grad():
        lp, ent, v = policy.evaluate_actions(out.vision_feats, torch.as_tensor(st), ids, mask, out.tokens,
                                             temperature=1.3)
    torch.testing.assert_close(lp, out.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(v, out.values, atol=1e-5, rtol=0)
    assert out.tokens.min() >= policy.model.vocab_start
    assert out.actions.shape == (5, 7)


def test_padding_does_not_change_a_row(policy):
    imgs, st = _obs(2)
    alone = policy.act(imgs[:1], st[:1], [INSTR[0]], greedy=True)
    batched = policy.act(imgs, st, [INSTR[0], INSTR[1]], greedy=True)
    assert torch.equal(alone.tokens[0], batched.tokens[0])
    torch.testing.assert_close(alone.values[0], batched.values[0], atol=1e-5, rtol=0)


def test_checkpoint_round_trip(policy, tmp_path):
    policy.norm_stats = NormStats.from_actions(np.random.default_rng(1).uniform(-1, 1, (50, 7)))
    save_policy(policy, tmp_path / "ckpt")
    again = load_policy(tmp_path / "ckpt")
    imgs, st = _obs(3, seed=2)
    a = policy.act(imgs, st, [INSTR[0]] * 3, greedy=True)
    b = again.act(imgs, st, [INSTR[0]] * 3, greedy=True)
    assert torch.equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.actions, b.actions)
    save_policy(again, tmp_path / "ckpt")  # overwrite in place, atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a preset"):
        load_policy(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_policy(tmp_path / "empty")


def test_wrong_image_size_is_explained(policy):
    with pytest.raises(ValueError, match="image_size=64"):
        policy.act(np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 8), np.float32), [INSTR[0]])


def test_gradient_checkpointing_gives_the_same_gradients():
    from vlarl_fast.policy.protocol import enable_gradient_checkpointing
    grads = []
    for ckpt in (False, True):
        p = make_policy("tiny", instructions=INSTR, seed=0, hidden_size=32, num_layers=2)
        if ckpt:
            enable_gradient_checkpointing(p.model)
        p.model.train()
        imgs, st = _obs(3)
        ids, mask = p.encode_prompts([INSTR[i % 2] for i in range(3)])
        tokens = torch.full((3, 7), p.model.vocab_start + 5)
        lp, _, _ = p.evaluate_actions(p.encode_images(imgs), torch.as_tensor(st), ids, mask, tokens)
        lp.sum().backward()
        grads.append({n: q.grad.clone() for n, q in p.model.named_parameters() if q.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)
