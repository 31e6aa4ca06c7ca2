"""Full sharding (``--dist.shard full``, FSDP2) on two gloo ranks: the same gradients, rollouts and checkpoints as
one process with the whole model, and a whole run that resumes exactly."""
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_dist import _cli

from vlarl_fast.dist.launch import free_port

INSTR = ["reach the red cube", "lift it"]
SMOKE = ["--preset", "smoke", "--progress", "False", "--eval.heldout-episodes", "0", "--eval.init-states", "1",
         "--eval.episodes-per-state", "1", "--dist.shard", "full", "--ppo.train-layers", "0"]


def _policy():
    from vlarl_fast.policy import make_policy
    return make_policy("tiny", instructions=INSTR, image_size=32, seed=0, hidden_size=32, num_layers=2)


def _batch(B=8):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 255, (B, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
    states = torch.randn(B, 8, generator=g).numpy()
    return images, states, [INSTR[i % 2] for i in range(B)], torch.randn(B, generator=g)


def _loss(policy, images, states, instructions, tokens, adv, rows):
    from vlarl_fast.rl.ppo import ppo_losses
    model = policy.model
    ids, mask = policy.encode_prompts([instructions[i] for i in rows])
    feats = model.encode_images(model.preprocess_images(torch.as_tensor(images[rows])))
    logp, _, values = policy.evaluate_actions(feats, torch.as_tensor(states[rows]), ids, mask, tokens[rows])
    pg, v, _, _ = ppo_losses(logp.sum(-1), logp.sum(-1).detach(), adv[rows], values, values.detach() + 1,
                             clip_low=0.2, clip_high=0.2)
    return pg + 0.5 * v


def _two_sharded_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from vlarl_fast.dist.comm import Comm
    from vlarl_fast.dist.fsdp import full_tensor, gathered, load_sharded, save_sharded, shard_policy, whole_state_dicts
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    comm = Comm(rank=rank, world=2)
    result = {}
    B = 8
    images, states, instructions, adv = _batch(B)

    # one process, the whole model: its actions and the gradient of the whole minibatch
    whole = _policy()
    ref = whole.act(images, states, instructions, generator=torch.Generator().manual_seed(2))
    tokens = ref.tokens
    _loss(whole, images, states, instructions, tokens, adv, list(range(B))).backward()
    single = {k: p.grad for k, p in whole.model.named_parameters() if p.grad is not None}

    policy = _policy()
    root = shard_policy(policy, comm)
    result["sharded"] = all(type(p).__name__ == "DTensor" for p in policy.model.parameters())
    total = sum(p.numel() for p in whole.model.parameters())
    result["param_share"] = sum(p.to_local().numel() for p in policy.model.parameters()) / total
    with gathered(root):   # the rollout's decoding reads the weights directly
        out_ = policy.act(images, states, instructions, generator=torch.Generator().manual_seed(2))
    result["same_tokens"] = bool(torch.equal(out_.tokens, ref.tokens))
    result["logp_diff"] = float((out_.logprobs - ref.logprobs).abs().max())
    rows = list(range(rank * B // 2, (rank + 1) * B // 2))
    root(lambda: _loss(policy, images, states, instructions, tokens, adv, rows)).backward()
    averaged = {k: full_tensor(p.grad) for k, p in policy.model.named_parameters() if p.grad is not None}
    result["grad_keys_equal"] = sorted(single) == sorted(averaged)
    result["grad_max_diff"] = max(float((single[k] - averaged[k]).abs().max()) for k in single)

    # a step, a sharded checkpoint, another step, then the checkpoint back: the first step's weights and moments
    opt = torch.optim.Adam(policy.model.parameters(), lr=1e-2)
    opt.step()
    result["moment_share"] = sum(v["exp_avg"].to_local().numel() for v in opt.state.values()) / total
    ckpt = Path(out) / "sharded"
    save_sharded(ckpt, root, {"optimizer": opt})
    with whole_state_dicts(root):
        saved = {k: v.clone() for k, v in policy.model.state_dict().items()}
    moments = {k: full_tensor(v["exp_avg"]).clone() for k, v in zip(range(99), opt.state.values())}
    root(lambda: _loss(policy, images, states, instructions, tokens, adv, rows)).backward()
    opt.step()
    load_sharded(ckpt, root, {"optimizer": opt})
    with whole_state_dicts(root):
        back = policy.model.state_dict()
    if rank == 0:   # the whole weights are rank 0's, which writes the checkpoints
        result["whole_state_is_plain"] = all(type(v) is torch.Tensor for v in back.values())
        result["state_keys_equal"] = sorted(back) == sorted(whole.model.state_dict())
        result["restored_diff"] = max(float((saved[k] - back[k]).abs().max()) for k in saved)
        result["stepped"] = any(not torch.equal(saved[k], whole.model.state_dict()[k]) for k in saved)
    else:
        result["nothing_on_rank1"] = not saved and not back
    result["moments_diff"] = max(float((moments[k] - full_tensor(v["exp_avg"])).abs().max())
                                 for k, v in zip(range(99), opt.state.values()))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_two_sharded_ranks_act_and_average_gradients_as_one_process(tmp_path):
    import torch.multiprocessing as mp
    mp.start_processes(_two_sharded_ranks, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["sharded"]
        # each rank holds about half of every weight and of Adam's moments (dim 0 split in two, odd ones unevenly)
        assert 0.45 < r["param_share"] < 0.55 and 0.45 < r["moment_share"] < 0.55
        assert r["same_tokens"] and r["logp_diff"] < 1e-5
        assert r["grad_keys_equal"] and r["grad_max_diff"] < 1e-5
        assert r["moments_diff"] == 0.0
    assert r0["whole_state_is_plain"] and r0["state_keys_equal"] and r0["stepped"]
    assert r0["restored_diff"] == 0.0 and r1["nothing_on_rank1"]


# ---- whole runs -----------------------------------------------------------------------------------------------
def test_a_sharded_two_rank_run_writes_sharded_checkpoints_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file
    run = tmp_path / "run"
    p = _cli(*SMOKE, "--dist.nproc", "2", "--ppo.iterations", "4", "--ire.every", "2", "--checkpoint-every", "1",
             "--checkpoint-keep", "10", "--output-dir", str(run), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 4
    ckpt = run / "checkpoints" / "rl-00002"
    assert (ckpt / "sharded").is_dir() and (ckpt / "state.rank1.pt").is_file()
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["model"] == "sharded" and state["optimizer"] == "sharded"   # no weights beside the shards

    # the same run stopped after iteration 2 (a supervised stage in its state: its moments for the vision tower,
    # which PPO keeps frozen) and resumed to 4 (the next stage steps them)
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    for d in ("rl-00003", "rl-00004", "final"):
        shutil.rmtree(cut / "checkpoints" / d)
    r = _cli("--resume", str(cut), "--ppo.iterations", "4", "--progress", "False", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(run / "checkpoints" / "final" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((cut / "summary.json").read_text())["resumed"]


@pytest.mark.parametrize("bad,fix", [(["--ppo.train-layers", "1"], "--ppo.train-layers 0"),
                                     (["--ppo.lora-rank", "4"], "--ppo.lora-rank 0"),
                                     (["--ppo.kl-coef", "0.1"], "--ppo.kl-coef 0")])
def test_sharding_refuses_what_it_cannot_train_before_any_rank_starts(tmp_path, bad, fix):
    p = _cli(*SMOKE, "--dist.nproc", "2", *bad, "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert p.returncode == 2 and fix in p.stderr


def test_a_sharded_run_with_a_separate_critic_finishes(tmp_path):
    run = tmp_path / "run"
    p = _cli(*SMOKE, "--dist.nproc", "2", "--ppo.critic", "separate", "--ppo.iterations", "2", "--ppo.critic-warmup",
             "1", "--output-dir", str(run), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["updates"] == 2
    assert (run / "checkpoints" / "final" / "critic.safetensors").is_file()


# ---- an OpenVLA on one rank: the tiny one here, the 7B-shaped one in the GPU tier ------------------------------
OPENVLA_INSTR = ["pick up the black bowl and place it on the plate", "open the top drawer"]


def fsdp_smoke(model, device: str, batch: int) -> dict:
    """One rank of FSDP2 (a process group of one, as ``--dist.shard full --dist.nproc 1`` runs) over a bfloat16
    OpenVLA: the shards' dtype, a sampled ``act`` with the whole weights gathered, one PPO step through the root
    unit; the first ratio (the update's log-probs against the rollout's, the same bfloat16 weights), and on a
    GPU the peak memory."""
    import torch.distributed as dist

    from vlarl_fast.dist.comm import Comm
    from vlarl_fast.dist.fsdp import full_tensor, gathered, shard_policy
    from vlarl_fast.policy import NormStats, VLAPolicy
    from vlarl_fast.policy.openvla import build_llama_tokenizer
    from vlarl_fast.rl.ppo import ppo_losses
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    try:
        res = {}
        policy = VLAPolicy(model, build_llama_tokenizer(OPENVLA_INSTR), NormStats.identity())
        root = shard_policy(policy, Comm(device=device if cuda else "cpu"))
        res["shard_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
        g = torch.Generator().manual_seed(0)
        size = model.config.image_sizes[0]
        images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).numpy()
        states = np.zeros((batch, 1), np.float32)
        instructions = [OPENVLA_INSTR[i % 2] for i in range(batch)]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with gathered(root):
            # the value head as the unsharded model keeps it (float32), everything else in the model's dtype
            res["gathered_dtypes"] = sorted({str(p.dtype) for n, p in model.named_parameters()
                                             if not n.startswith("value_head.")})
            res["gathered_head_dtypes"] = sorted({str(p.dtype) for p in model.value_head.parameters()})
            out = policy.act(images, states, instructions, generator=torch.Generator(device).manual_seed(1))
        if cuda:
            torch.cuda.synchronize()
        res["act_s"] = time.perf_counter() - t0
        old = out.logprobs.sum(-1).float()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5, eps=1e-5)

        def loss():
            imgs, st = policy.to_tensor_obs(images, states)
            text_ids, text_mask = policy.encode_prompts(instructions)
            feats = model.encode_images(model.preprocess_images(imgs))
            logp, _, values = policy.evaluate_actions(feats, st, text_ids, text_mask, out.tokens.to(device))
            new = logp.sum(-1).float()
            pg, v, kl, _ = ppo_losses(new, old, torch.ones(batch, device=device), values, values.detach() + 1,
                                      clip_low=0.2, clip_high=0.28)
            return pg + 0.5 * v, (new - old).exp(), kl
        t0 = time.perf_counter()
        total, ratio, kl = root(loss)
        res["tensors"] = {"act_logprobs": out.logprobs.float().cpu(), "update_ratio": ratio.detach().cpu()}
        total.backward()
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0))
        before = next(model.parameters()).to_local().clone()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        res["update_s"] = time.perf_counter() - t0
        res["first_ratio_error"] = float((ratio.detach() - 1).abs().max())
        res["first_approx_kl"] = float(kl)
        res["grad_norm"] = float(grad_norm)
        res["moved"] = not torch.equal(before, next(model.parameters()).to_local())
        if cuda:
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            res["device"] = torch.cuda.get_device_name()
        return res
    finally:
        dist.destroy_process_group()


def test_fsdp_smoke_on_a_tiny_bf16_openvla():
    """The GPU smoke's function on the CPU: bfloat16 weights become float32 shards, gathered back to bfloat16
    (exactly the weights the model had) for the rollout and the forward, which then compute exactly what the
    unsharded model computes."""
    import copy

    from vlarl_fast.policy import NormStats, VLAPolicy
    from vlarl_fast.policy.openvla import OpenVLAConfig, build_llama_tokenizer, random_openvla
    model = random_openvla(OpenVLAConfig.tiny(), "cpu", torch.bfloat16, std=0.2)
    whole = VLAPolicy(copy.deepcopy(model), build_llama_tokenizer(OPENVLA_INSTR), NormStats.identity())
    res = fsdp_smoke(model, "cpu", batch=4)
    # the unsharded model on the same inputs
    batch, size = 4, model.config.image_sizes[0]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).numpy()
    states = np.zeros((batch, 1), np.float32)
    instructions = [OPENVLA_INSTR[i % 2] for i in range(batch)]
    out = whole.act(images, states, instructions, generator=torch.Generator("cpu").manual_seed(1))
    imgs, st = whole.to_tensor_obs(images, states)
    text_ids, text_mask = whole.encode_prompts(instructions)
    with torch.no_grad():
        feats = whole.model.encode_images(whole.model.preprocess_images(imgs))
        logp, _, _ = whole.evaluate_actions(feats, st, text_ids, text_mask, out.tokens)
    ratio = (logp.sum(-1).float() - out.logprobs.sum(-1).float()).exp()
    assert torch.equal(res["tensors"]["act_logprobs"], out.logprobs.float())
    assert torch.equal(res["tensors"]["update_ratio"], ratio)
    assert res["shard_dtypes"] == ["torch.float32"] and res["gathered_dtypes"] == ["torch.bfloat16"]
    assert res["gathered_head_dtypes"] == ["torch.float32"]
    assert res["moved"] and np.isfinite(res["grad_norm"]) and res["grad_norm"] > 0
    assert res["first_ratio_error"] < 0.1   # the fused decoding and transformers' forward, both in bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the gpu tier)")
def test_fsdp_smoke_on_one_gpu_at_openvla_7b_shape():
    """OpenVLA-7B's vision towers, width, heads and vocabulary with 8 of its 32 LM layers: full fine-tuning keeps
    float32 masters, gradients and Adam's moments (16 bytes a parameter), which for all 32 layers fill more
    than one GPU before any activation; more ranks shard them."""
    from dataclasses import replace

    from test_bf16_training import _record

    from vlarl_fast.policy.openvla import OpenVLAConfig, random_openvla
    cfg = OpenVLAConfig.openvla_7b()
    cfg = replace(cfg, text={**cfg.text, "num_hidden_layers": 8})
    res = fsdp_smoke(random_openvla(cfg, "cuda", torch.bfloat16), "cuda", batch=16)
    res.pop("tensors")
    print(json.dumps(res, indent=1))
    _record("fsdp2_one_gpu_openvla_7b_shape_8_layers", res)
    assert res["shard_dtypes"] == ["torch.float32"] and res["gathered_dtypes"] == ["torch.bfloat16"]
    assert res["gathered_head_dtypes"] == ["torch.float32"]
    assert res["moved"] and np.isfinite(res["grad_norm"]) and res["first_ratio_error"] < 0.1
