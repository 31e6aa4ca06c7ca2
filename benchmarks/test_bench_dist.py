"""Data-parallel RL on the CPU: `vlarl-fast train` with 2 ranks (gloo, each on its own core with its own env
worker) against 1 rank on the same cores, same envs, same iterations. The figure is the RL iterations' env steps
per second (history.json: rollout and update, no SFT or evaluation), ``two_vs_one_rank`` their ratio. Under
``--benchmark-disable`` it runs at a toy size as a smoke test."""
import json
import subprocess
import sys

import numpy as np
from _timing import record


def _steps_per_second(tmp_path, nproc: int, small: bool) -> float:
    run = tmp_path / f"n{nproc}"
    size = ["--preset", "smoke"] if small else ["--sft.demos-per-task", "2", "--sft.demo-layouts", "2",
                                                "--sft.epochs", "1", "--ppo.iterations", "8", "--ire.every", "0"]
    p = subprocess.run([sys.executable, "-m", "vlarl_fast.cli", "train", *size, "--dist.nproc", str(nproc),
                        "--eval.init-states", "1", "--eval.episodes-per-state", "1", "--eval.heldout-episodes", "0",
                        "--progress", "False", "--tensorboard", "False", "--checkpoint-every", "0",
                        "--output-dir", str(run)], capture_output=True, text=True, cwd=tmp_path, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    history = json.loads((run / "history.json").read_text())
    return float(np.mean([h["sps"] for h in history[1:] or history]))   # the first iteration warms up


def test_two_ranks_vs_one(benchmark, tmp_path):
    small = benchmark.disabled
    results = {}

    def both():
        results["one"] = _steps_per_second(tmp_path, 1, small)
        results["two"] = _steps_per_second(tmp_path, 2, small)

    benchmark.pedantic(both, rounds=1, iterations=1)
    ratio = results["two"] / results["one"]
    record(benchmark, f"PPO iterations, tabletop default envs and policy: 1 rank {results['one']:.0f} env steps/s, "
           f"2 ranks {results['two']:.0f}: x{ratio:.2f}", one_rank_steps_per_s=results["one"],
           two_ranks_steps_per_s=results["two"], two_vs_one_rank=ratio)
    assert np.isfinite(ratio)
