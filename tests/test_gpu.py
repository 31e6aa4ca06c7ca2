"""The GPU tier (``pytest -m gpu``; skipped without CUDA): what a user on an NVIDIA machine hits first.

- the compiled extension on this machine's numpy (a batch created, attached and viewed);
- a worker-process VectorEnv whose workers render through EGL on the GPU, at OpenVLA's 224 px;
- the smoke ``train`` on CUDA with the default env backend;
- both Triton kernels against their references at OpenVLA's shapes, in bfloat16 for the log-probs.

The 7B-shaped OpenVLA checks (first PPO ratio, ``act`` throughput, a LoRA PPO iteration) live in
tests/test_bf16_training.py beside their CPU twins. Figures worth keeping go to the JSON file named by
``VLARL_GPU_RESULTS`` when it is set.
"""
import json
import time

import numpy as np
import pytest
import torch
from test_bf16_training import _record as record

pytestmark = pytest.mark.gpu


def test_extension_batch_on_this_numpy():
    from vlarl_fast._ext import require_ext
    C = require_ext()
    b = C.SharedBatch.create(None, 4, {"image": ("uint8", (64, 64, 3)), "reward": ("float32", ())})
    w = C.SharedBatch.attach(b.name)
    w.write("image", 2, np.full((64, 64, 3), 7, np.uint8))
    w.array("reward")[3] = 1.5
    assert int(b.array("image")[2].sum()) == 7 * 64 * 64 * 3 and float(b["reward"][3]) == 1.5
    w.close()
    b.close()


def _tabletop_fns(n, size=224):
    from vlarl_fast.envs import make_env
    return [lambda: make_env("tabletop/reach_red", image_size=size) for _ in range(n)]


def test_process_vector_env_renders_on_the_gpu():
    from vlarl_fast.envs import VectorEnv
    t0 = time.perf_counter()
    with VectorEnv(_tabletop_fns(4), num_workers=2) as venv:  # the default backend: worker processes
        assert venv.backend == "process", venv.backend_reason
        obs, _ = venv.reset(seed=0)
        assert obs["image"].shape == (4, 224, 224, 3) and obs["image"].std() > 1.0
        steps = 20
        t1 = time.perf_counter()
        for _ in range(steps):
            obs, *_ = venv.step(np.zeros((4, 7), np.float32))
        rate = 4 * steps / (time.perf_counter() - t1)
        gpus = sorted({e.get("CUDA_VISIBLE_DEVICES", "none") for e in venv._worker_env})
    record("egl_workers_224px", {"env_steps_per_s": round(rate, 1), "start_s": round(t1 - t0, 1), "gpus": gpus})
    assert "none" not in gpus, "a worker did not render on a GPU"


def test_workers_start_while_pytorch_caches_most_of_the_gpu():
    """EGL needs free device memory for its framebuffers; a training process's allocator cache must not
    starve the workers (it failed as 'Offscreen framebuffer is not complete, error 0x8cdd')."""
    from vlarl_fast.envs import VectorEnv
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - (256 << 20), dtype=torch.uint8, device="cuda")
    del hog  # freed, but still held by PyTorch's cache
    assert torch.cuda.mem_get_info()[0] < (512 << 20)
    with VectorEnv(_tabletop_fns(4), num_workers=4) as venv:
        obs, _ = venv.reset(seed=0)
        assert obs["image"].std() > 1.0


def test_smoke_train_on_cuda_with_default_backend(tmp_path):
    from vlarl_fast.cli import main
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["train", "--preset", "smoke", "--device", "cuda", "--output-dir", str(out),
                 "--progress", "False"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    record("smoke_train_cuda", {"wall_s": round(time.perf_counter() - t0, 1),
                                **{k: summary.get(k) for k in ("sft_success", "rl_success", "env_steps")}})


def test_action_logprobs_triton_at_openvla_shape_bf16(monkeypatch):
    """Llama-2-7B's hidden size and OpenVLA's padded vocabulary; the 256 action ids are a slice."""
    import test_kernels_logprobs
    from test_kernels_logprobs import _check_against_reference
    # sums of 4096 products: float32 rounding in another order reaches ~1e-5 of the logits' scale
    monkeypatch.setitem(test_kernels_logprobs.TOL, torch.bfloat16, dict(out=2e-5, grad=2e-2))
    V, H = 32064, 4096
    for N in (7, 7 * 64 + 3):
        _check_against_reference(N, H, V, torch.bfloat16, 32000 - 256, 32000, 1.0, backend="triton",
                                 device="cuda")
    _check_against_reference(57, H, V, torch.bfloat16, 0, None, 1.0, backend="triton", device="cuda")


def test_gae_triton_at_rollout_shape():
    from test_kernels_gae import _assert_matches_reference, _case
    _assert_matches_reference(_case(512, 257, seed=0, device="cuda"), 0.99, 0.95, backend="triton")
