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


# ---------------------------------------------------------------------------------------------
# Float32 weights for what behaviour cloning trains (docs/precision.md)
# ---------------------------------------------------------------------------------------------
def test_sft_of_a_float32_model_is_plain_adamw_bit_for_bit():
    """The default CPU run (tiny VLA in float32, bfloat16 autocast where the CPU has it): SFT steps the
    model's own weights exactly as AdamW on them always did, the same losses and the same weights."""
    from vlarl_fast.policy import NormStats
    from vlarl_fast.policy.precision import mixed_precision, resolve_bc_autocast
    from vlarl_fast.rl.sft import lr_factor, sft_train
    images, states, instructions, actions = _bc_batch(12, 32, seed=3)
    data = {"images": images, "states": states, "instructions": instructions, "actions": actions}
    dtype = resolve_bc_autocast("auto", "cpu")
    epochs, batch, lr, wd, warmup = 2, 8, 1e-3, 0.01, 1
    torch.manual_seed(0)
    p = _policy(32)
    losses = sft_train(p, data, epochs=epochs, batch_size=batch, lr=lr, weight_decay=wd, seed=0,
                       warmup_steps=warmup, autocast_dtype=dtype)

    torch.manual_seed(0)
    ref = _policy(32)
    ref.norm_stats = NormStats.from_actions(actions)
    tokens = ref.tokens_from_actions(actions)
    model = ref.model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    rng = np.random.default_rng(0)
    ref_losses = []
    for _ in range(epochs):
        perm, tot = rng.permutation(12), 0.0
        for s in range(2):
            idx = perm[s * batch:(s + 1) * batch]
            imgs, st = ref.to_tensor_obs(images[idx], states[idx])
            ids, mask = ref.encode_prompts([instructions[i] for i in idx])
            with mixed_precision("cpu", dtype):
                feats = model.encode_images(model.preprocess_images(imgs))
                loss = -ref.evaluate_actions(feats, st, ids, mask, tokens[idx])[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        ref_losses.append(tot / 12)
    assert losses == ref_losses
    for (name, a), b in zip(p.model.named_parameters(), model.parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name


OPENVLA_INSTR = ["pick up the black bowl and place it on the plate", "open the top drawer"]


def _bf16_openvla_policy():
    from vlarl_fast.policy import VLAPolicy
    from vlarl_fast.policy.openvla import build_llama_tokenizer, random_tiny_openvla
    model = random_tiny_openvla(seed=2, value_hidden=16).to(torch.bfloat16)
    return VLAPolicy(model, build_llama_tokenizer(OPENVLA_INSTR), None)


def _openvla_demos(n, image_size, seed=0):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8),
            "states": np.zeros((n, 1), np.float32), "actions": rng.uniform(-1, 1, (n, 7)).astype(np.float32),
            "instructions": [OPENVLA_INSTR[i % 2] for i in range(n)]}


def _watched(model):
    # the language model's and the projector's matrices: every entry gets a gradient from the BC loss
    return {n: p for n, p in model.named_parameters()
            if p.dim() > 1 and n.startswith(("language_model.model.layers.", "projector."))}


def test_bc_step_on_a_bf16_model_steps_float32_masters_by_what_bf16_would_lose():
    from vlarl_fast.policy import NormStats
    from vlarl_fast.rl.sft import bc_optimizer, bc_step
    pol = _bf16_openvla_policy()
    model = pol.model
    data = _openvla_demos(8, model.config.image_size)
    pol.norm_stats = NormStats.from_actions(data["actions"])
    model.train()
    trained = [q for q in model.parameters() if q.requires_grad]
    opt, masters = bc_optimizer(pol, trained, lr=1e-5, weight_decay=0.0)
    # the forward keeps the 16-bit weights; AdamW steps float32 tensors only
    watched = _watched(model)
    assert watched and all(q.dtype == torch.bfloat16 for q in watched.values())
    assert all(q.dtype == torch.float32 for g in opt.param_groups for q in g["params"])
    master = dict((id(q), m) for q, m in masters.pairs)
    assert all(id(q) in master for q in watched.values())
    assert all(q.dtype == torch.float32 for q in model.value_head.parameters())   # in place, as in PPO
    before = {n: master[id(q)].detach().clone() for n, q in watched.items()}
    loss = bc_step(pol, opt, data["images"], data["states"], data["instructions"],
                   pol.tokens_from_actions(data["actions"]), masters=masters)
    assert np.isfinite(loss)
    state = [s for s in opt.state.values() if s]
    assert state and all(s[k].dtype == torch.float32 for s in state for k in ("exp_avg", "exp_avg_sq"))
    for n, q in watched.items():
        m = master[id(q)].detach()
        assert q.grad is None and torch.equal(q.detach(), m.to(torch.bfloat16)), n   # the model follows
        delta = m - before[n]
        rel = (delta.abs() / before[n].abs().clamp(min=1e-12)).median()
        assert (delta != 0).float().mean() > 0.95 and 1e-5 < float(rel) < 1e-3, (n, float(rel))
        # the same step on the bfloat16 weights themselves rounds away almost everywhere
        w16 = before[n].to(torch.bfloat16)
        assert ((w16 + delta.to(torch.bfloat16)) != w16).float().mean() < 0.1, n


def test_bc_step_refuses_an_optimizer_over_bf16_weights():
    from vlarl_fast.policy import NormStats
    from vlarl_fast.policy.precision import PrecisionError
    from vlarl_fast.rl.sft import bc_step
    pol = _bf16_openvla_policy()
    data = _openvla_demos(2, pol.model.config.image_size)
    pol.norm_stats = NormStats.from_actions(data["actions"])
    opt = torch.optim.AdamW(pol.model.parameters(), lr=1e-5)
    with pytest.raises(PrecisionError, match="MasterWeights"):
        bc_step(pol, opt, data["images"], data["states"], data["instructions"],
                pol.tokens_from_actions(data["actions"]))


def test_sft_on_a_bf16_openvla_moves_weights_that_bf16_adamw_cannot():
    """20 steps at lr 5e-5 on a fixed batch: the float32 masters drift ~5e-4 and carry the bfloat16 weights
    with them. AdamW on the bfloat16 weights cannot move any weight above 0.1 at all: its step is at most
    ~3.2 lr = 1.6e-4 ((1 - beta1) / sqrt(1 - beta2)), below half a bfloat16 step there (> |w| 2^-9 = 2e-4),
    so it rounds away every time (measured: 0 of them move)."""
    from vlarl_fast.rl.sft import sft_train
    pol = _bf16_openvla_policy()
    model = pol.model
    data = _openvla_demos(8, model.config.image_size)
    watched = _watched(model)
    before = {n: q.detach().clone() for n, q in watched.items()}
    losses = sft_train(pol, data, epochs=20, batch_size=8, lr=5e-5, weight_decay=0.0, seed=0)
    assert losses[-1] < losses[0]
    for n, q in watched.items():
        assert q.dtype == torch.bfloat16, n
        big = before[n].abs() > 0.1
        moved = ((q.detach() != before[n]) & big).sum() / big.sum()
        assert moved > 0.3, (n, float(moved))   # measured: ~0.6


# ---------------------------------------------------------------------------------------------
# Moving average of the weights (--sft.ema-decay)
# ---------------------------------------------------------------------------------------------
def test_weight_ema_matches_the_scalar_recursion():
    from vlarl_fast.rl.sft import WeightEMA
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g)]
    ema = WeightEMA(w, 0.9)
    ref = [t.clone() for t in w]
    for step in range(1, 40):
        for t in w:
            t.add_(torch.randn(t.shape, generator=g))
        ema.update()
        d = min(0.9, (1 + step) / (10 + step))
        ref = [d * r + (1 - d) * t for r, t in zip(ref, w)]
    for a, b in zip(ema.shadow, ref):
        torch.testing.assert_close(a, b)
    ema.copy_to_tensors()
    for a, b in zip(w, ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(w, 1.0)


def test_sft_with_ema_ends_at_the_average_of_its_trajectory(monkeypatch):
    """SFT with ``ema_decay`` takes plain SFT's trajectory (the average never feeds back: the same losses)
    and ends at the moving average of the weights along it."""
    from vlarl_fast.rl.sft import WeightEMA, sft_train
    images, states, instructions, actions = _bc_batch(12, 32, seed=3)
    data = {"images": images, "states": states, "instructions": instructions, "actions": actions}
    kw = dict(epochs=3, batch_size=8, lr=3e-3, weight_decay=0.0, seed=0, warmup_steps=1)
    initial = [q.detach().clone() for q in _policy(32).model.parameters() if q.requires_grad]
    seen, real_update = [], WeightEMA.update

    def spy(self):   # the weights after each optimiser step
        seen.append([t.detach().clone() for t in self.tensors])
        real_update(self)
    monkeypatch.setattr(WeightEMA, "update", spy)
    p = _policy(32)
    losses = sft_train(p, data, ema_decay=0.5, **kw)
    plain = _policy(32)
    assert losses == sft_train(plain, data, **kw)
    trained = [q.detach() for q in plain.model.parameters() if q.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(seen[-1], trained))
    ref = initial
    for step, ws in enumerate(seen, start=1):
        d = min(0.5, (1 + step) / (10 + step))
        ref = [d * r + (1 - d) * w for r, w in zip(ref, ws)]
    got = [q.detach() for q in p.model.parameters() if q.requires_grad]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(got, trained))
