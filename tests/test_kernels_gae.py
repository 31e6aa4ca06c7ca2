"""GAE: the CPU scan and the Triton kernel against the readable loop (``gae_reference``), plus
hand-computed cases for terminations, truncations with bootstrap values and episode ends inside
the horizon."""
import os

import pytest
import torch

from _launch_spy import LaunchSpy, recording_guard
from _triton_child import run_triton_tests_under_interpreter

from vlarl_fast.kernels import gae, gae_reference, gae_stepwise


def _case(T, N, seed, p_term=0.1, p_trunc=0.05, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g)
    values = torch.randn(T, N, generator=g)
    next_values = torch.randn(T, N, generator=g)
    u = torch.rand(T, N, generator=g)
    terminated = (u < p_term).float()
    truncated = ((u >= p_term) & (u < p_term + p_trunc)).float()
    next_values = torch.where(terminated.bool(), torch.zeros_like(next_values), next_values)
    episode_end = torch.clamp(terminated + truncated, max=1)
    return tuple(x.to(device) for x in (rewards, values, next_values, terminated, episode_end))


def _assert_matches_reference(args, gamma, lam, backend):
    adv, ret = gae(*args, gamma, lam, backend=backend)
    cpu = tuple(a.cpu() for a in args)
    adv_ref, ret_ref = gae_reference(*cpu, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.device == args[0].device
    torch.testing.assert_close(adv.cpu(), adv_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.cpu(), ret_ref, rtol=1e-5, atol=1e-5)


# T below, at, and across the scan's 16-step blocks (1, 7, 16, 33, 64) and a long horizon (300)
@pytest.mark.parametrize("T,N", [(1, 1), (7, 3), (16, 4), (33, 17), (64, 5), (300, 6)])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_reference(T, N, gamma, lam):
    args = _case(T, N, seed=T * 100 + N)
    _assert_matches_reference(args, gamma, lam, backend=None)
    adv, ret = gae_stepwise(*args, gamma, lam)  # the benchmarks' vectorised baseline is right too
    torch.testing.assert_close(adv, gae_reference(*args, gamma, lam)[0], rtol=1e-5, atol=1e-5)


def test_gae_accepts_bool_flags_and_long_episodes():
    # bool flags as the buffer may store them; no episode end for 500 steps: (gamma*lam)^k decays far
    # below float32's range edge without harm (products underflow to 0, never to nan)
    args = list(_case(500, 3, seed=5, p_term=0.0, p_trunc=0.0))
    args[3], args[4] = args[3].bool(), args[4].bool()
    _assert_matches_reference(tuple(args), 0.99, 0.95, backend="torch")
    _assert_matches_reference(tuple(args), 0.5, 0.1, backend="torch")


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


def test_episode_ends_inside_horizon_in_two_columns():
    # column 0: terminates at t=2 then a new episode runs to the horizon (bootstrapped at t=4);
    # column 1: truncated at t=1 and terminated at t=3. Expected values by hand, gamma=0.9, lam=0.8.
    g, lam = 0.9, 0.8
    gl = g * lam
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 2.0]])
    v = torch.tensor([[0.2, 0.1], [0.3, 0.2], [0.4, 0.3], [0.1, 0.4], [0.6, 0.5]])
    nv = torch.tensor([[0.3, 0.2], [0.4, 3.0], [7.0, 0.4], [0.6, 9.0], [0.7, 0.6]])
    term = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    end = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    adv, _ = gae(r, v, nv, term, end, g, lam)
    d = r + g * (1 - term) * nv - v
    col0 = [0.0] * 5
    col0[4] = d[4, 0]
    col0[3] = d[3, 0] + gl * col0[4]
    col0[2] = d[2, 0]                      # terminal: nothing from t=3 leaks back
    col0[1] = d[1, 0] + gl * col0[2]
    col0[0] = d[0, 0] + gl * col0[1]
    col1 = [0.0] * 5
    col1[4] = d[4, 1]
    col1[3] = d[3, 1]                      # terminal: nv=9 ignored, and t=4 does not leak back
    col1[2] = d[2, 1] + gl * col1[3]
    col1[1] = d[1, 1]                      # truncated: bootstrapped with nv=3, cut from t=2
    col1[0] = d[0, 1] + gl * col1[1]
    assert float(d[1, 1]) == pytest.approx(1.0 + 0.9 * 3.0 - 0.2)
    expected = torch.tensor([[float(a), float(b)] for a, b in zip(col0, col1)])
    torch.testing.assert_close(adv, expected)


def test_empty_horizon():
    z = torch.zeros(0, 4)
    adv, ret = gae(z, z, z, z, z, 0.99, 0.95)
    assert adv.shape == ret.shape == (0, 4)


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
    with pytest.raises(ValueError, match="backend"):
        gae(a, a, a, a, a, 0.99, 0.95, backend="numba")


@pytest.mark.parametrize("odd", ["rewards", "values", "episode_end"])
def test_inputs_on_two_devices_are_named_with_their_devices(odd):
    # 'meta' stands in for a second device on a CPU-only machine: the check must come before any math
    names = ["rewards", "values", "next_values", "terminated", "episode_end"]
    args = [torch.zeros(4, 2, device="meta" if n == odd else "cpu") for n in names]
    with pytest.raises(ValueError, match=rf"one device; got .*{odd} on meta.*\.to\(rewards\.device\)"):
        gae(*args, 0.99, 0.95)


# ---- Triton kernel -------------------------------------------------------------------------
@pytest.fixture
def triton_device():
    """'cuda' on a GPU machine; 'cpu' inside the TRITON_INTERPRET=1 child started by
    test_triton_gae_under_interpreter (the variable must be set before triton is first imported)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess of test_triton_gae_under_interpreter")
    return "cpu"


@pytest.mark.parametrize("T,N", [(1, 1), (9, 3), (40, 37)])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0)])
def test_triton_gae_matches_reference(triton_device, T, N, gamma, lam):
    _assert_matches_reference(_case(T, N, seed=T + N, device=triton_device), gamma, lam, backend="triton")


def test_triton_gae_default_backend_and_bool_flags(triton_device):
    args = list(_case(20, 5, seed=11, device=triton_device))
    args[3], args[4] = args[3].bool(), args[4].bool()
    backend = None if triton_device == "cuda" else "triton"
    _assert_matches_reference(tuple(args), 0.99, 0.95, backend=backend)


def test_triton_gae_launches_inside_its_device_guard(triton_device, monkeypatch):
    import vlarl_fast.kernels._triton_gae as tk
    open_guards = recording_guard(monkeypatch)
    spy = LaunchSpy(tk._gae_kernel, probe=lambda: list(open_guards))
    monkeypatch.setattr(tk, "_gae_kernel", spy)
    args = _case(9, 3, seed=2, device=triton_device)
    _assert_matches_reference(args, 0.99, 0.95, backend="triton")
    assert spy.seen == [[args[0].device]] and open_guards == []


def test_triton_gae_under_interpreter():
    """Runs this file's Triton tests in a child pytest with TRITON_INTERPRET=1 (CPU machines)."""
    run_triton_tests_under_interpreter(__file__, "triton_gae")


# ---- devices (GPU machines) ----------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_gae_runs_on_its_tensors_gpu_not_the_current_one(monkeypatch):
    """Tensors on the last GPU while cuda:0 is current (one GPU: both are cuda:0)."""
    import vlarl_fast.kernels._triton_gae as tk
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    spy = LaunchSpy(tk._gae_kernel, probe=torch.cuda.current_device)
    monkeypatch.setattr(tk, "_gae_kernel", spy)
    with torch.cuda.device(0):
        args = _case(40, 37, seed=4, device=dev)
        _assert_matches_reference(args, 0.99, 0.95, backend=None)
        assert torch.cuda.current_device() == 0
    assert spy.seen == [dev.index]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("index", range(torch.cuda.device_count()))
def test_gae_results_stay_on_the_inputs_gpu(index):
    dev = torch.device("cuda", index)
    adv, ret = gae(*_case(5, 3, seed=index, device=dev), 0.9, 0.8)
    assert adv.device == ret.device == dev
