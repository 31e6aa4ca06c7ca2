"""action_logprobs: every output and gradient of both backends against a readable torch reference.

The reference below is written out again on purpose (not imported from the package): it is the
public contract in three lines. The Triton backend runs compiled on a CUDA machine and
under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors, tiny shapes) otherwise.
"""
import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from _launch_spy import LaunchSpy, recording_guard
from _triton_child import run_triton_tests_under_interpreter

from vlarl_fast.kernels import action_logprobs
from vlarl_fast.kernels.memory_probe import cpu_peaks

# the submodule, not the function of the same name that vlarl_fast.kernels re-exports
al_mod = importlib.import_module("vlarl_fast.kernels.action_logprobs")


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny: with two OpenMP threads on a loaded 2-core machine each small matmul
    can wait on a descheduled thread (measured: 0.3 s instead of 0.04 s per case, 7 s under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference(hidden, weight, targets, temperature=1.0, vocab_start=0, vocab_end=None):
    vocab_end = weight.shape[0] if vocab_end is None else vocab_end
    logits = (hidden @ weight[vocab_start:vocab_end].T).float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, (targets - vocab_start)[:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


# tolerances per dtype, relative to the largest magnitude of the compared reference tensor:
# fp32 paths differ from the reference only by summation order; bf16 inputs give bf16 gradients
# (8 mantissa bits) and, on the Triton path, a bf16 d-logits buffer feeding the matmuls.
TOL = {torch.float32: dict(out=2e-6, grad=2e-5), torch.bfloat16: dict(out=2e-6, grad=2e-2)}


def _assert_close(actual, expected, tol, what):
    actual, expected = actual.detach(), expected.detach()
    scale = max(float(expected.abs().max()), 1.0)
    err = float((actual.float() - expected.float()).abs().max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} x {scale:.3g}"


def _case(N, H, V, dtype, seed, vocab_start=0, vocab_end=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    # logits ~ N(0, 4): a peaked, non-uniform softmax
    weight = torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)
    ve = V if vocab_end is None else vocab_end
    targets = torch.randint(vocab_start, ve, (N,), generator=g)
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return (hidden.to(device, dtype), weight.to(device, dtype), targets.to(device), g_logp.to(device),
            g_ent.to(device))


def _check_against_reference(N, H, V, dtype, vocab_start, vocab_end, temperature, backend, entropy=True,
                             device="cpu"):
    hidden, weight, targets, g_logp, g_ent = _case(N, H, V, dtype, seed=N * 7 + V, vocab_start=vocab_start,
                                                   vocab_end=vocab_end, device=device)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    kw = dict(temperature=temperature, vocab_start=vocab_start, vocab_end=vocab_end)
    out = action_logprobs(h, w, targets, return_entropy=entropy, backend=backend, **kw)
    logp, ent = out if entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    loss.backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype

    # the kernels accumulate in fp32: the exact value they target is the reference on upcast inputs
    h32 = hidden.float().requires_grad_()
    w32 = weight.float().requires_grad_()
    ref_logp, ref_ent = reference(h32, w32, targets, **kw)
    ((ref_logp * g_logp).sum() + ((ref_ent * g_ent).sum() if entropy else 0.0)).backward()

    tol = TOL[dtype]
    _assert_close(logp, ref_logp, tol["out"], "logp")
    if entropy:
        assert ent.dtype == torch.float32
        _assert_close(ent, ref_ent, tol["out"], "entropy")
    _assert_close(h.grad, h32.grad, tol["grad"], "d hidden")
    _assert_close(w.grad, w32.grad, tol["grad"], "d weight")
    if dtype != torch.float32:
        # and against the reference in the input dtype (its logits rounded to bf16 first)
        lo_logp, lo_ent = reference(hidden, weight, targets, **kw)
        _assert_close(logp, lo_logp, 5e-2, "logp vs bf16 reference")
        if entropy:
            _assert_close(ent, lo_ent, 5e-2, "entropy vs bf16 reference")
    # rows of the weight outside the slice get exactly zero gradient
    ve = V if vocab_end is None else vocab_end
    assert not w.grad[:vocab_start].any() and not w.grad[ve:].any()


# (N, H, V): a single row, odd non-powers of two, and a vocabulary wider than one default chunk
SHAPES = [(1, 16, 8), (37, 24, 53), (130, 65, 1031)]
SLICES = [(0, None), "odd"]


def _slice(V, which):
    return (0, None) if which == (0, None) else (V // 3, V - V // 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("which", SLICES, ids=["full", "slice"])
@pytest.mark.parametrize("N,H,V", SHAPES)
@pytest.mark.parametrize("chunk", ["default", "tiny"])
def test_torch_path_matches_reference(N, H, V, which, temperature, dtype, chunk, monkeypatch):
    if chunk == "tiny":
        # many small chunks of an odd width: every chunk boundary of the online logsumexp is exercised
        monkeypatch.setattr(al_mod, "_CHUNK_BYTES", 1)
        monkeypatch.setattr(al_mod, "_MIN_CHUNK", 13)
    vs, ve = _slice(V, which)
    _check_against_reference(N, H, V, dtype, vs, ve, temperature, backend="torch")


def test_torch_path_without_entropy_and_cpu_default():
    _check_against_reference(37, 24, 53, torch.float32, 5, 50, 1.3, backend=None, entropy=False)


def test_entropy_of_uniform_and_peaked():
    H, V = 8, 40
    hidden = torch.zeros(3, H)
    weight = torch.randn(V, H)
    _, ent = action_logprobs(hidden, weight, torch.zeros(3, dtype=torch.long), return_entropy=True)
    torch.testing.assert_close(ent, torch.full((3,), float(torch.log(torch.tensor(float(V))))))
    # large logits: the shifted accumulation keeps a near-zero entropy accurate (lse - E[z] would cancel)
    weight = torch.zeros(V, H)
    weight[3, 0] = 1.0
    hidden = torch.zeros(1, H)
    hidden[0, 0] = 1000.0
    logp, ent = action_logprobs(hidden, weight, torch.tensor([3]), return_entropy=True)
    assert abs(float(logp)) < 1e-6 and 0.0 <= float(ent) < 1e-6


def test_no_grad_and_frozen_weight():
    hidden, weight, targets, _, _ = _case(9, 16, 30, torch.float32, seed=3)
    with torch.no_grad():
        logp = action_logprobs(hidden, weight, targets)
    torch.testing.assert_close(logp, reference(hidden, weight, targets)[0])
    h = hidden.clone().requires_grad_()
    action_logprobs(h, weight, targets).sum().backward()  # frozen lm_head: only d hidden
    h32 = hidden.clone().requires_grad_()
    reference(h32, weight, targets)[0].sum().backward()
    torch.testing.assert_close(h.grad, h32.grad)


# ---- bad input -----------------------------------------------------------------------------
def test_bad_input_names_the_fix():
    hidden, weight, targets, _, _ = _case(4, 8, 20, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"\[N, H\].*\[V, H\]"):
        action_logprobs(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="targets must be"):
        action_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="integer token ids"):
        action_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="outside|span"):
        action_logprobs(hidden, weight, targets.clamp(max=9), vocab_start=10)
    with pytest.raises(ValueError, match="vocab_start"):
        action_logprobs(hidden, weight, targets, vocab_end=21)
    with pytest.raises(ValueError, match="temperature"):
        action_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="share a dtype"):
        action_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="backend"):
        action_logprobs(hidden, weight, targets, backend="cuda")


@pytest.mark.parametrize("odd", ["hidden", "weight", "targets"])
def test_inputs_on_two_devices_are_named_with_their_devices(odd):
    # 'meta' stands in for a second device on a CPU-only machine; hidden on it must not reach the
    # autocast query (which knows only real device types) before the check
    hidden, weight, targets, _, _ = _case(4, 8, 20, torch.float32, seed=1)
    args = {"hidden": hidden, "weight": weight, "targets": targets}
    args[odd] = args[odd].to("meta")
    with pytest.raises(ValueError, match=rf"one device; got .*{odd} on meta.*\.to\(hidden\.device\)"):
        action_logprobs(**args)


def test_non_finite_inputs_are_reported():
    hidden, weight, targets, _, _ = _case(4, 8, 20, torch.float32, seed=2)
    bad = hidden.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\].*hidden contains NaN"):
        action_logprobs(bad, weight, targets)
    bad = weight.clone()
    bad[5, 0] = float("inf")
    with pytest.raises(ValueError, match="weight rows"):
        action_logprobs(hidden, bad, targets)
    # a NaN outside the slice is never read: no error, same result
    bad[5, 0] = float("nan")
    t = targets.clamp(min=10)
    torch.testing.assert_close(action_logprobs(hidden, bad, t, vocab_start=10),
                               action_logprobs(hidden, weight, t, vocab_start=10))


# ---- Triton backend ------------------------------------------------------------------------
@pytest.fixture
def triton_device():
    """'cuda' when a GPU is present (compiled kernels); 'cpu' inside the interpreter subprocess
    started by test_triton_path_under_interpreter (triton.jit, and triton.language's own helpers,
    read TRITON_INTERPRET when they are defined, i.e. before triton is first imported, so the
    variable cannot be switched on inside this process without affecting the rest of the suite)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess of test_triton_path_under_interpreter")
    assert importlib.import_module("vlarl_fast.kernels._triton_logprobs").interpreting()
    return "cpu"


def test_triton_path_under_interpreter():
    """Runs this file's Triton tests in a child pytest with TRITON_INTERPRET=1 (CPU machines)."""
    run_triton_tests_under_interpreter(__file__, "triton_path")


# small shapes: the interpreter is 500-8000x slower than torch. (5, 16, 300) spans several vocab
# splits of the forward (merged in torch) and several backward tiles.
TRITON_CASES = [
    (5, 16, 20, (0, None), 1.0),
    (37, 24, 53, (10, 45), 0.7),
    (5, 16, 300, (7, 291), 1.3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,H,V,sl,temperature", TRITON_CASES)
def test_triton_path_matches_reference(triton_device, N, H, V, sl, temperature, dtype):
    _check_against_reference(N, H, V, dtype, sl[0], sl[1], temperature, backend="triton", device=triton_device)


def test_triton_path_logp_only_and_many_backward_chunks(triton_device, monkeypatch):
    import vlarl_fast.kernels._triton_logprobs as tk
    monkeypatch.setattr(tk, "_CHUNK_BYTES", 1)  # one BLOCK_V-wide chunk per backward step
    _check_against_reference(6, 16, 70, torch.float32, 3, 61, 0.9, backend="triton", entropy=False,
                             device=triton_device)


def test_triton_path_strided_targets(triton_device):
    # a column of a [N, 7] token array, as the policy passes them: not contiguous
    hidden, weight, _, _, _ = _case(5, 16, 20, torch.float32, seed=6, device=triton_device)
    tokens = torch.randint(0, 20, (5, 7), generator=torch.Generator().manual_seed(6)).to(triton_device)
    targets = tokens[:, 3]
    assert not targets.is_contiguous()
    torch.testing.assert_close(action_logprobs(hidden, weight, targets, backend="triton"),
                               reference(hidden, weight, targets)[0], rtol=1e-5, atol=1e-5)


def test_triton_path_launches_inside_its_device_guard(triton_device, monkeypatch):
    import vlarl_fast.kernels._triton_logprobs as tk
    open_guards = recording_guard(monkeypatch)
    spies = {}
    for name in ("_fwd_kernel", "_dlogits_kernel"):
        spies[name] = LaunchSpy(getattr(tk, name), probe=lambda: list(open_guards))
        monkeypatch.setattr(tk, name, spies[name])
    _check_against_reference(5, 16, 20, torch.float32, 0, None, 1.0, backend="triton", device=triton_device)
    dev = torch.device(triton_device) if triton_device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    assert spies["_fwd_kernel"].seen == [[dev]] and spies["_dlogits_kernel"].seen == [[dev]]
    assert open_guards == []


def test_triton_path_reports_non_finite(triton_device):
    hidden, weight, targets, _, _ = _case(4, 16, 20, torch.float32, seed=4, device=triton_device)
    hidden[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\].*hidden"):
        action_logprobs(hidden, weight, targets, backend="triton")


# ---- memory property of the torch path ---------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_torch_path_peak_memory_is_a_fraction_of_naive():
    # fwd+bwd high-water RSS above what was resident before the call, in a fresh process. glibc is
    # told to mmap every block over 64 KiB, so a freed temporary leaves RSS at once and the
    # high-water mark is the peak of live bytes (not of arena pages kept for reuse).
    # Naive: N x V x 4 B = 262 MB per full-vocabulary temporary.
    peaks = cpu_peaks(2048, 32, 32064, weight_scale=0.2, timeout=300)
    assert peaks["fused"] <= peaks["naive"] / 4, {k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()}


@pytest.mark.parametrize("n,h,vs,ve", [(1, 8, 0, 5), (13, 24, 3, 259), (70, 40, 100, 357)])
def test_action_logprobs_under_autocast_computes_in_float32(n, h, vs, ve):
    """Under bfloat16 autocast the LM hands over bfloat16 hidden states with the float32 head weight: the
    log-probs are those of the float32 reference on those hidden states, gradients included."""
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, h, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(ve + 3, h, generator=g).requires_grad_()
    targets = torch.randint(vs, ve, (n,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = action_logprobs(hidden, weight, targets, vocab_start=vs, vocab_end=ve, return_entropy=True,
                                    temperature=0.7)
        (logp.sum() + 0.5 * ent.sum()).backward()   # backward inside autocast too
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().clone().requires_grad_()
    ref_logp, ref_ent = reference(h32, w32, targets, temperature=0.7, vocab_start=vs, vocab_end=ve)
    (ref_logp.sum() + 0.5 * ref_ent.sum()).backward()
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weight.grad, w32.grad, rtol=1e-5, atol=1e-5)


# ---- devices (GPU machines) ----------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_action_logprobs_runs_on_its_tensors_gpu_not_the_current_one(monkeypatch):
    """Forward and backward on the last GPU while cuda:0 is current (one GPU: both are cuda:0)."""
    import vlarl_fast.kernels._triton_logprobs as tk
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    spies = {}
    for name in ("_fwd_kernel", "_dlogits_kernel"):
        spies[name] = LaunchSpy(getattr(tk, name), probe=torch.cuda.current_device)
        monkeypatch.setattr(tk, name, spies[name])
    with torch.cuda.device(0):
        for dtype in (torch.float32, torch.bfloat16):
            _check_against_reference(37, 24, 53, dtype, 10, 45, 0.7, backend=None, device=dev)
        assert torch.cuda.current_device() == 0
    assert spies["_fwd_kernel"].seen == spies["_dlogits_kernel"].seen == [dev.index] * 2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("index", range(torch.cuda.device_count()))
def test_action_logprobs_results_stay_on_the_inputs_gpu(index):
    dev = torch.device("cuda", index)
    hidden, weight, targets, _, _ = _case(6, 16, 40, torch.float32, seed=index, device=dev)
    h = hidden.requires_grad_()
    logp, ent = action_logprobs(h, weight, targets, return_entropy=True)
    logp.sum().backward()
    assert logp.device == ent.device == h.grad.device == dev
