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
