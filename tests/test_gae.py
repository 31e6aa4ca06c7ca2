import pytest
import torch

from vlarl_fast.kernels import gae, gae_reference


def _case(T, N, seed, p_term=0.1, p_trunc=0.05):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g)
    values = torch.randn(T, N, generator=g)
    next_values = torch.randn(T, N, generator=g)
    u = torch.rand(T, N, generator=g)
    terminated = (u < p_term).float()
    truncated = ((u >= p_term) & (u < p_term + p_trunc)).float()
    next_values = torch.where(terminated.bool(), torch.zeros_like(next_values), next_values)
    return rewards, values, next_values, terminated, torch.clamp(terminated + truncated, max=1)


@pytest.mark.parametrize("T,N", [(1, 1), (7, 3), (33, 17), (64, 5)])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_reference(T, N, gamma, lam):
    args = _case(T, N, seed=T * 100 + N)
    adv, ret = gae(*args, gamma, lam)
    adv_ref, ret_ref = gae_reference(*args, gamma, lam)
    torch.testing.assert_close(adv, adv_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ret_ref, rtol=1e-5, atol=1e-5)


def test_truncation_bootstraps_and_stops_propagation():
    # one env, 3 steps: episode truncated at t=1 (time limit), new episode at t=2
    r = torch.tensor([[1.0], [0.0], [5.0]])
    v = torch.tensor([[0.5], [0.25], [0.0]])
    nv = torch.tensor([[0.25], [2.0], [0.0]])  # V(final obs)=2 at the truncation; V(s3)=0
    term = torch.zeros(3, 1)
    end = torch.tensor([[0.0], [1.0], [0.0]])
    g, lam = 0.5, 0.5
    adv, ret = gae(r, v, nv, term, end, g, lam)
    d2 = 5.0 - 0.0
    d1 = 0.0 + g * 2.0 - 0.25          # bootstrapped, not scored as failure
    d0 = 1.0 + g * 0.25 - 0.5
    expected = torch.tensor([[d0 + g * lam * d1], [d1], [d2]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + v)


def test_termination_zeroes_bootstrap():
    r = torch.tensor([[1.0]])
    v = torch.tensor([[0.3]])
    nv = torch.tensor([[9.0]])  # ignored: terminal
    adv, _ = gae(r, v, nv, torch.ones(1, 1), torch.ones(1, 1), 0.99, 0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.7]]))


def test_bad_shapes_and_nan():
    a = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="shape"):
        gae(a, a, a, a, torch.zeros(4, 3), 0.99, 0.95)
    with pytest.raises(ValueError, match="time-major"):
        gae(torch.zeros(4), a, a, a, a, 0.99, 0.95)
    bad = a.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gae(a, bad, a, a, a, 0.99, 0.95)
