"""One behaviour-cloning step (SFT and iRe's supervised stages) of the default tiny VLA (64 px, 4 layers,
batch 64, the whole model trained): float32 against bfloat16 autocast (``--sft.bc-autocast``), the same
batch and weights. The speed-up needs native bfloat16 (``vlarl-fast info``: BC precision); elsewhere
bfloat16 is emulated and the ratio says so. Under ``--benchmark-disable`` it runs at a toy size."""
import numpy as np
import torch
from _timing import median_seconds, record

from vlarl_fast.envs.tabletop.tasks import TASKS
from vlarl_fast.policy import NormStats, make_policy
from vlarl_fast.policy.precision import cpu_native_bf16
from vlarl_fast.rl.sft import bc_step


def test_bc_step_bfloat16_autocast(benchmark):
    small = benchmark.disabled
    batch = 4 if small else 64
    instructions = [t.instruction for t in TASKS.values()]
    pol = make_policy("tiny", instructions=instructions, image_size=64, seed=0,
                      **({"hidden_size": 32, "num_layers": 2} if small else {}))
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (batch, 7)).astype(np.float32)
    pol.norm_stats = NormStats.from_actions(actions)
    images = rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    states = rng.normal(size=(batch, 8)).astype(np.float32)
    ins = [instructions[i % len(instructions)] for i in range(batch)]
    tokens = pol.tokens_from_actions(actions)
    # lr 0: every call times the same step on the same weights
    opt = torch.optim.AdamW(pol.model.parameters(), lr=0.0)
    pol.model.train()

    def step(dtype):
        return lambda: bc_step(pol, opt, images, states, ins, tokens, autocast_dtype=dtype)

    benchmark.pedantic(step(torch.bfloat16), rounds=3, iterations=1)
    if small:
        return
    t32, t16 = median_seconds(step(None), 15), median_seconds(step(torch.bfloat16), 15)
    native = cpu_native_bf16() or "none: emulated"
    record(benchmark, f"BC step, batch {batch}, default tiny VLA, CPU bfloat16 {native}: float32 {t32 * 1e3:.0f} ms, "
           f"bfloat16 autocast {t16 * 1e3:.0f} ms: x{t32 / t16:.2f}", float32_s=t32, bfloat16_s=t16,
           speedup=t32 / t16)
