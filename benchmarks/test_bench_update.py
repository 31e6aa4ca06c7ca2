"""One PPO gradient step on the tiny VLA of `vlarl-fast train` (64 px, the top layer trained): the whole forward
from cached vision features (``evaluate_actions``, the baseline) against the trained layer alone from its
cached inputs (``evaluate_frozen``, ``--ppo.cache-frozen-layers``), on the same minibatch of rollout rows.
Under ``--benchmark-disable`` it runs at a toy size as a smoke test."""
import numpy as np
import torch
from _timing import median_seconds, record

from vlarl_fast.config import PolicyConfig, PPOConfig
from vlarl_fast.envs.tabletop.tasks import TASKS
from vlarl_fast.policy import make_policy
from vlarl_fast.rl.buffer import RolloutBuffer
from vlarl_fast.rl.trainer import freeze_below_top_layers


def test_update_step_from_frozen_inputs(benchmark):
    small = benchmark.disabled
    steps, envs, mb = (2, 4, 8) if small else (6, 48, 256)
    instructions = [t.instruction for t in TASKS.values()]
    size = {"hidden_size": 32, "num_layers": 2} if small else \
        {"hidden_size": PolicyConfig().hidden_size, "num_layers": PolicyConfig().num_layers}
    pol = make_policy("tiny", instructions=instructions, image_size=64, seed=0, **size)
    model = pol.model
    for p in model.vision_tower.parameters():
        p.requires_grad_(False)
    freeze_below_top_layers(model, PPOConfig().train_layers)
    first = len(model.decoder.layers) - PPOConfig().train_layers
    rng = np.random.default_rng(0)
    buf = RolloutBuffer(steps, envs)
    for t in range(steps):
        ins = [instructions[(t + i) % len(instructions)] for i in range(envs)]
        images = rng.integers(0, 256, (envs, 64, 64, 3), dtype=np.uint8)
        states = rng.normal(size=(envs, 8)).astype(np.float32)
        out = pol.act(images, states, ins, generator=torch.Generator().manual_seed(t), capture_layer=first)
        buf.add(t, out.vision_feats, torch.as_tensor(states), out.tokens, out.logprobs, out.values, ins, out.frozen)
    data = buf.flat()
    idx = rng.permutation(steps * envs)[:mb]
    tokens = data["tokens"][idx]
    params = [p for p in model.parameters() if p.requires_grad]

    def full():
        ids, mask = pol.encode_prompts([data["instructions"][i] for i in idx])
        logp, _, values = pol.evaluate_actions(data["obs"][idx], data["states"][idx], ids, mask, tokens)
        (logp.sum() + values.sum()).backward()
        for p in params:
            p.grad = None

    def cached():
        logp, _, values = pol.evaluate_frozen(buf.frozen_rows(idx), tokens, first)
        (logp.sum() + values.sum()).backward()
        for p in params:
            p.grad = None

    model.train()
    model.vision_tower.eval()
    benchmark.pedantic(cached, rounds=3, iterations=1)
    if small:
        return
    t_full, t_cached = median_seconds(full, 7), median_seconds(cached, 7)
    record(benchmark, f"PPO step, minibatch {mb}, tiny VLA ({size['num_layers']} layers, {size['hidden_size']} wide), "
           f"top layer trained: whole forward {t_full * 1e3:.0f} ms, from cached layer inputs {t_cached * 1e3:.0f} ms: "
           f"x{t_full / t_cached:.2f}",
           full_s=t_full, cached_s=t_cached, speedup=t_full / t_cached)
