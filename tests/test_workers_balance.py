"""Render-device balancing as a pure function, with simulated per-env costs, and the device
variables each worker gets (any number of GPUs, none included)."""
import itertools

import pytest

from vlarl_fast.envs.balance import assign_devices, device_loads, plan_rebalance
from vlarl_fast.envs.render_devices import machine, narrow_by_cuda_visible, worker_render_vars


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
    with pytest.raises(ValueError, match="2 costs for 3"):
        worker_render_vars("cpu", 3, costs=[1.0, 1.0])


def test_cuda_visible_devices_narrows_physical_ids():
    uuids = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-dddd"]
    assert narrow_by_cuda_visible(uuids, None) == [0, 1, 2, 3]
    assert narrow_by_cuda_visible(uuids, "3,1") == [3, 1]
    assert narrow_by_cuda_visible(uuids, "GPU-cc,0") == [2, 0]
    assert narrow_by_cuda_visible(uuids, "1,7,2") == [1]   # CUDA stops at the first invalid entry
    assert narrow_by_cuda_visible(uuids, "") == []


def test_worker_envs_any_number_of_gpus():
    # 8 workers on GPUs 3 and 5 (the parent saw CUDA_VISIBLE_DEVICES=3,5): each worker's EGL id is its GPU's own
    # EGL device (here listed after Mesa's, in reverse), never a rank or a CUDA index; CUDA_VISIBLE_DEVICES names
    # the same GPU by UUID (render_devices.py; tests/test_render_devices.py covers the matching)
    from vlarl_fast.envs.render_devices import EglDevice, Gpu, plan_render_devices, visible
    gpus = [Gpu(i, f"GPU-{i:08x}-0000-0000-0000-000000000000", f"0000:{16 + i:02x}:00.0", "H200") for i in range(6)]
    egl = [EglDevice(0, ("EGL_MESA_device_software",))]
    egl += [EglDevice(6 - i, (), None, g.pci_bus_id) for i, g in enumerate(gpus)]
    envs, _ = plan_render_devices("auto", 8, visible(gpus, "3,5", None), egl)
    assert [e["MUJOCO_EGL_DEVICE_ID"] for e in envs] == ["3", "1"] * 4
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == [gpus[3].uuid, gpus[5].uuid] * 4
    assert all(e["MUJOCO_GL"] == "egl" for e in envs)
    assert all(e["MUJOCO_GL"] in ("egl", "osmesa") for e in worker_render_vars("cpu", 3))  # Mesa on the CPU


def test_visible_gpus_without_a_gpu_is_empty_not_an_error():
    gpus = machine()["gpus"]
    assert isinstance(gpus, list) and all(isinstance(g.index, int) for g in gpus)


def test_plan_rebalance_from_the_worst_start():
    # half the envs twice as costly (say two cameras), all of them on worker 0 at start (i % 2)
    costs = [2.0, 1.0] * 4
    owner = [i % 2 for i in range(8)]
    plan = plan_rebalance(costs, owner, 2)
    assert device_loads(costs, plan, 2) == [6.0, 6.0]
    assert sum(p != w for p, w in zip(plan, owner)) == 1  # 8 against 4: one costly env moves
    # two costly envs against three cheap ones: a move reaches 4/7, a swap the best, 5/6
    costs = [4.0, 4.0, 1.0, 1.0, 1.0]
    plan = plan_rebalance(costs, [0, 0, 1, 1, 1], 2)
    assert sorted(device_loads(costs, plan, 2)) == [5.0, 6.0]
    # equal costs and counts: measurement noise alone never moves an env
    noisy = [1.0, 1.05, 0.97, 1.02, 0.99, 1.04]
    assert plan_rebalance(noisy, [i % 3 for i in range(6)], 3) is None
    # a gain below min_gain x the mean load is not worth the moves
    assert plan_rebalance([1.1, 1.0, 1.0, 0.9], [0, 0, 1, 1], 2) is None
    # one env per worker: nothing to gain
    assert plan_rebalance([5.0, 1.0], [0, 1], 2) is None


@pytest.mark.parametrize("seed", range(8))
def test_plan_rebalance_lands_near_optimal_from_any_start(seed):
    import random
    rng = random.Random(seed)
    costs = [rng.uniform(0.01, 0.3) for _ in range(7)]
    for k in (2, 3):
        owner = [rng.randrange(k) for _ in costs]
        plan = plan_rebalance(costs, owner, k, min_gain=0.0) or owner
        assert max(device_loads(costs, plan, k)) <= 4 / 3 * _best_makespan(costs, k) + 1e-12
        assert plan_rebalance(costs, plan, k, min_gain=0.0) is None  # a plan is stable


def test_plan_rebalance_bad_input():
    with pytest.raises(ValueError, match="must give a worker"):
        plan_rebalance([1.0, 1.0], [0], 2)
    with pytest.raises(ValueError, match="must give a worker"):
        plan_rebalance([1.0, 1.0], [0, 2], 2)
