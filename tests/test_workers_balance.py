"""Render-device balancing as a pure function, with simulated per-env costs, and the device
variables each worker gets (any number of GPUs, none included)."""
import itertools

import pytest

from vlarl_fast.envs.balance import (assign_devices, device_loads, narrow_by_cuda_visible, render_env,
                                     visible_gpus, worker_render_envs)


def _best_makespan(costs, k):
    return min(max(device_loads(costs, a, k)) for a in itertools.product(range(k), repeat=len(costs)))


def test_equal_costs_round_robin_and_deterministic():
    assert assign_devices([1.0] * 7, 3) == [0, 1, 2, 0, 1, 2, 0]
    assert assign_devices([2.0, 2.0], 1) == [0, 0]
    assert assign_devices([], 4) == []


def test_longest_first_balances_simulated_costs():
    # one slow scene (e.g. two cameras at 128 px) and many cheap ones
    costs = [0.20, 0.02, 0.02, 0.05, 0.05, 0.09, 0.02, 0.01]
    a = assign_devices(costs, 2)
    assert a[0] == 0 and all(a[i] == 1 for i in (5, 3, 4))  # the big one alone-ish, the rest fill device 1
    loads = device_loads(costs, a, 2)
    assert max(loads) <= 4 / 3 * _best_makespan(costs, 2) + 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_greedy_within_four_thirds_of_optimal(seed):
    import random
    rng = random.Random(seed)
    costs = [rng.uniform(0.01, 0.3) for _ in range(7)]
    for k in (2, 3):
        loads = device_loads(costs, assign_devices(costs, k), k)
        assert max(loads) <= 4 / 3 * _best_makespan(costs, k) + 1e-12


def test_bad_input():
    with pytest.raises(ValueError, match="at least one render device"):
        assign_devices([1.0], 0)
    with pytest.raises(ValueError, match="non-negative"):
        assign_devices([-1.0], 1)
    with pytest.raises(ValueError, match="2 costs for 3 envs"):
        worker_render_envs(3, gpus=[0], costs=[1.0, 1.0])


def test_cuda_visible_devices_narrows_physical_ids():
    uuids = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-dddd"]
    assert narrow_by_cuda_visible(uuids, None) == [0, 1, 2, 3]
    assert narrow_by_cuda_visible(uuids, "3,1") == [3, 1]
    assert narrow_by_cuda_visible(uuids, "GPU-cc,0") == [2, 0]
    assert narrow_by_cuda_visible(uuids, "1,7,2") == [1]   # CUDA stops at the first invalid entry
    assert narrow_by_cuda_visible(uuids, "") == []


def test_worker_envs_any_number_of_gpus():
    # 8 workers on GPUs 3 and 5 (the parent saw CUDA_VISIBLE_DEVICES=3,5): ids are physical, never a rank
    envs = worker_render_envs(8, gpus=[3, 5])
    assert [e["MUJOCO_EGL_DEVICE_ID"] for e in envs] == ["3", "5"] * 4
    assert all(e["CUDA_VISIBLE_DEVICES"] == e["MUJOCO_EGL_DEVICE_ID"] and e["MUJOCO_GL"] == "egl" for e in envs)
    assert worker_render_envs(3, gpus=[]) == [{}, {}, {}]  # CPU rendering: nothing to set
    assert render_env(None) == {}


def test_visible_gpus_without_a_gpu_is_empty_not_an_error():
    gpus = visible_gpus()
    assert isinstance(gpus, list) and all(isinstance(g, int) for g in gpus)
