"""The behaviour-cloning schedule and augmentation."""
import numpy as np
import pytest
import torch

from vlarl_fast.rl.sft import lr_factor, random_shift


def test_lr_factor_warms_up_linearly_then_decays_to_the_floor():
    total, warm = 1000, 100
    f = np.array([lr_factor(s, total, warm) for s in range(total + 50)])
    assert f[0] == pytest.approx(1 / warm)
    assert f[warm - 1] == pytest.approx(1.0)
    assert np.all(np.diff(f[:warm]) > 0)
    assert f[warm] == pytest.approx(1.0)
    assert np.all(np.diff(f[warm:total]) <= 1e-12)
    assert f[total] == pytest.approx(0.1)
    assert f[-1] == pytest.approx(0.1)   # past the end the floor holds


def test_lr_factor_without_warmup_starts_at_full_rate():
    assert lr_factor(0, 10) == pytest.approx(1.0)
    assert lr_factor(5, 10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, 10, floor=0.0) == pytest.approx(0.0)


def test_random_shift_moves_whole_images_within_the_pad():
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(3, 9, 11, 3, dtype=torch.uint8)
    img[:, 4, 5] = 255                       # one bright pixel in the middle
    out = random_shift(img, 2, g)
    assert out.shape == img.shape and out.dtype == torch.uint8
    for b in range(3):
        ys, xs = torch.nonzero(out[b, ..., 0], as_tuple=True)
        assert len(ys) == 1                  # moved, not smeared
        assert abs(int(ys[0]) - 4) <= 2 and abs(int(xs[0]) - 5) <= 2
    assert torch.equal(random_shift(img, 0, g), img)


# ---------------------------------------------------------------------------------------------
# bfloat16 autocast of the behaviour-cloning step against float32
# ---------------------------------------------------------------------------------------------
INSTR = ["move the gripper to the red cube", "push the blue cube onto the green zone"]


def _bc_batch(n, image_size, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    states = rng.normal(size=(n, 8)).astype(np.float32)
    actions = rng.uniform(-1, 1, (n, 7)).astype(np.float32)
    return images, states, [INSTR[i % 2] for i in range(n)], actions


def _policy(image_size):
    from vlarl_fast.policy import NormStats, make_policy
    p = make_policy("tiny", instructions=INSTR, image_size=image_size, seed=0, hidden_size=32, num_layers=2)
    p.norm_stats = NormStats.from_actions(np.random.default_rng(1).uniform(-1, 1, (64, 7)).astype(np.float32))
    p.model.train()
    return p


@pytest.mark.parametrize("n,image_size", [(1, 32), (5, 48), (17, 32)])
def test_bc_step_in_bfloat16_autocast_matches_float32(n, image_size):
    from vlarl_fast.rl.sft import bc_step
    images, states, instructions, actions = _bc_batch(n, image_size, seed=n)
    grads, losses = {}, {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        p = _policy(image_size)
        tokens = p.tokens_from_actions(actions)
        # lr 0: the step computes loss and gradients but leaves the weights where they are
        opt = torch.optim.SGD(p.model.parameters(), lr=0.0)
        losses[name] = bc_step(p, opt, images, states, instructions, tokens, autocast_dtype=dtype)
        grads[name] = torch.cat([q.grad.flatten() for q in p.model.parameters() if q.grad is not None])
        assert all(q.dtype == torch.float32 for q in p.model.parameters())   # the master weights stay float32
        assert all(q.grad is None or q.grad.dtype == torch.float32 for q in p.model.parameters())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    g32, g16 = grads["fp32"], grads["bf16"]
    assert g16.shape == g32.shape and torch.isfinite(g16).all()
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert (g16.norm() / g32.norm()).item() == pytest.approx(1.0, abs=0.05)


def test_sft_in_bfloat16_autocast_learns_like_float32():
    from vlarl_fast.rl.sft import sft_train
    images, states, instructions, actions = _bc_batch(24, 32, seed=0)
    data = {"images": images, "states": states, "instructions": instructions, "actions": actions}
    curves = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        p = _policy(32)
        curves[name] = sft_train(p, data, epochs=20, batch_size=8, lr=1e-2, weight_decay=0.0, seed=0,
                                 autocast_dtype=dtype)
    assert curves["bf16"][-1] < 0.5 * curves["bf16"][0]   # it learns
    assert curves["bf16"][-1] == pytest.approx(curves["fp32"][-1], rel=0.1)


def test_resolve_bc_autocast():
    from vlarl_fast.policy.precision import PrecisionError, cpu_native_bf16, resolve_bc_autocast
    assert resolve_bc_autocast("off", "cpu") is None
    assert resolve_bc_autocast("bfloat16", "cpu") is torch.bfloat16
    assert resolve_bc_autocast("auto", "cpu") is (torch.bfloat16 if cpu_native_bf16() else None)
    assert cpu_native_bf16() in (None, "amx", "avx512_bf16")
    with pytest.raises(PrecisionError, match="bc-autocast"):
        resolve_bc_autocast("fp8", "cpu")
