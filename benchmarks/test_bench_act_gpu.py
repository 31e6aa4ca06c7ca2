"""``policy.act`` at OpenVLA-7B shape on a CUDA GPU (random bfloat16 weights), batch 64, greedy: actions per
second of the fast decode, of transformers' batched ``generate`` on the same prompts, and of the hardware's
limit, all measured in the same run. The limit: the prefill's FLOPs (2 x language-model parameters x rows x
prompt columns) at the bfloat16 matrix-product rate measured here, plus 6 decode steps that each read the
language model's weights once at the copy bandwidth measured here (vision towers left out: they make it a
lower bound on the time). Skips without CUDA."""
import pytest
import torch
from _timing import median_seconds, record

from vlarl_fast.policy import VLAPolicy
from vlarl_fast.policy.decode import generate_actions
from vlarl_fast.policy.openvla import OpenVLAConfig, build_llama_tokenizer, random_openvla
from vlarl_fast.policy.precision import resolve_attention, set_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the gpu tier)")]

INSTR = ["pick up the black bowl and place it on the plate", "open the top drawer",
         "turn on the stove and put the moka pot on it"]
BF16 = torch.bfloat16


def matmul_flops_per_s(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=BF16)
    b = torch.randn(n, n, device="cuda", dtype=BF16)
    return 2 * n ** 3 / median_seconds(lambda: a @ b, 10, sync_cuda=True)


def copy_bytes_per_s(n_bytes: int = 2 << 30) -> float:
    x = torch.empty(n_bytes, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    return 2 * n_bytes / median_seconds(lambda: y.copy_(x), 10, sync_cuda=True)   # a read and a write


def test_act_at_openvla_7b_shape_vs_generate_and_the_limit(benchmark):
    B = 64
    model = random_openvla(OpenVLAConfig.openvla_7b(), "cuda", BF16)
    set_attention(model, resolve_attention("auto", "cuda", BF16))
    policy = VLAPolicy(model, build_llama_tokenizer(INSTR, vocab_size=model.config.pad_token_id), None,
                       device="cuda")
    g = torch.Generator().manual_seed(0)
    s = policy.config.image_size
    images = torch.randint(0, 256, (B, s, s, 3), dtype=torch.uint8, generator=g).numpy()
    instructions = [INSTR[i % 3] for i in range(B)]
    with torch.no_grad():
        _, (embeds, mask, pos) = policy._prompt(images, None, instructions)
    lm = model.language_model

    def act():
        with torch.no_grad():
            return policy.act(images, None, instructions, greedy=True)

    def generate():
        with torch.no_grad():
            _, (e, m, _) = policy._prompt(images, None, instructions)
            return generate_actions(lm, e, m, model.vocab_start, model.vocab_end, policy.tokenizer.pad_token_id)

    benchmark.pedantic(act, rounds=3, iterations=1, warmup_rounds=1)
    t_act = median_seconds(act, 5, sync_cuda=True)
    t_gen = median_seconds(generate, 5, sync_cuda=True)
    lm_params = sum(p.numel() for p in lm.parameters())
    lm_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    rate, bandwidth = matmul_flops_per_s(), copy_bytes_per_s()
    cols = mask.shape[1]
    t_limit = 2 * lm_params * B * cols / rate + 6 * lm_bytes / bandwidth
    act_ps, gen_ps, limit_ps = B / t_act, B / t_gen, B / t_limit
    record(benchmark, f"act, OpenVLA-7B shape, bf16, batch {B} ({cols} prompt columns) on "
           f"{torch.cuda.get_device_name()}: act {act_ps:.0f} actions/s, batched generate {gen_ps:.0f}, limit "
           f"{limit_ps:.0f} ({rate / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s): x{t_gen / t_act:.2f} vs "
           f"generate, {100 * act_ps / limit_ps:.0f}% of the limit",
           device=torch.cuda.get_device_name(), batch=B, prompt_columns=cols, act_per_s=act_ps,
           generate_per_s=gen_ps, limit_per_s=limit_ps, share_of_limit=act_ps / limit_ps,
           matmul_tflops=rate / 1e12, copy_tb_per_s=bandwidth / 1e12)
    assert act_ps > 0 and act_ps < 1.05 * limit_ps   # no path beats the hardware: a wrong limit would show here
