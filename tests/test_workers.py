"""The worker-process VectorEnv (backend="process"): alignment with the in-process VectorEnv step by
step (same seeds, same observations, rewards, flags and info, through auto-resets and with
reset_options), determinism, async send/recv, bad input, crash recovery, no leftover processes."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest

from _faulty_envs import RaiseOnStep
from vlarl_fast._ext import EXT_AVAILABLE, EXT_ERROR
from vlarl_fast.envs import VectorEnv, list_tasks, make_env

pytestmark = pytest.mark.skipif(not EXT_AVAILABLE, reason=f"extension not built: {EXT_ERROR}")
TASKS = list_tasks("tabletop")


def _fns(n, size=32, **kw):
    return [(lambda t=TASKS[i % len(TASKS)], i=i: make_env(t, image_size=size, seed=100 + i, **kw)) for i in range(n)]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _same(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k}]")
    else:
        assert np.array_equal(np.asarray(a), np.asarray(b)), where


def _compare(pv, iv, steps, seed):
    o1, i1 = pv.reset(seed=seed)
    o2, i2 = iv.reset(seed=seed)
    _same(o1, o2, "reset obs")
    _same(i1, i2, "reset info")
    rng = np.random.default_rng(seed)
    dones = 0
    for s in range(steps):
        a = rng.uniform(-1, 1, (pv.num_envs, 7)).astype(np.float32)
        r1, r2 = pv.step(a), iv.step(a)
        for x, y, name in zip(r1[:4], r2[:4], ("obs", "reward", "terminated", "truncated")):
            _same(x, y, f"step {s} {name}")
        info1 = dict(r1[4])
        assert not info1.pop("worker_restarted").any()
        _same(info1, r2[4], f"step {s} info")
        dones += int(r2[4]["done"].sum())
    return dones


# --- alignment and determinism ----------------------------------------------------------------

# 3 envs on 3 workers (one each), on 2 (envs 0 and 2 share one) and on 1 (all three in one process)
@pytest.mark.parametrize("num_workers,dispatch", [(3, "batched"), (3, "one_by_one"), (2, "batched"), (1, "batched")])
def test_alignment_with_inprocess_through_autoresets(num_workers, dispatch):
    fns = _fns(3, max_episode_steps=12)
    with VectorEnv(fns, backend="process", num_workers=num_workers) as pv, VectorEnv(fns, backend="inprocess") as iv:
        assert pv.num_workers == num_workers and len(pv.worker_pids) == num_workers
        if dispatch == "one_by_one":  # the readable dispatch path beside the batched one
            pv._start_steps = pv._start_steps_one_by_one
        assert pv.single_action_space == iv.single_action_space
        assert pv.single_observation_space == iv.single_observation_space
        assert _compare(pv, iv, 40, seed=5) >= 6  # several auto-resets happened
        _same(pv.observations([2, 0]), iv.observations([2, 0]), "observations()")
        assert pv.instructions == iv.instructions and pv.task_ids == iv.task_ids
        _same(pv.init_states, iv.init_states, "init_states")


@pytest.mark.parametrize("num_workers", [2, 1])
def test_alignment_with_reset_options_and_manual_resets(num_workers):
    # reset_options is called in the manager at each episode end, as in-process (curriculum's path);
    # with one worker, both envs' options travel through the same pipe
    def opts(rng_holder):
        return lambda i: {"init_state": int(rng_holder.integers(3))}
    fns = _fns(2, max_episode_steps=7)
    with VectorEnv(fns, backend="process", num_workers=num_workers,
                   reset_options=opts(np.random.default_rng(1))) as pv, \
            VectorEnv(fns, backend="inprocess", reset_options=opts(np.random.default_rng(1))) as iv:
        assert _compare(pv, iv, 20, seed=9) >= 4
        _same(pv.reset_env(1, seed=3, options={"init_state": 2}), iv.reset_env(1, seed=3, options={"init_state": 2}),
              "reset_env")
        assert pv.init_states[1] == 2
    # no auto-reset: the episode's last observation stays (evaluate.py's use)
    with VectorEnv(fns, backend="process", autoreset=False) as pv, \
            VectorEnv(fns, backend="inprocess", autoreset=False) as iv:
        for v in (pv, iv):
            v.reset(seed=0)
        a = np.zeros((2, 7), np.float32)
        for s in range(8):
            r1, r2 = pv._step_ids(a[:1], np.array([1])), iv._step_ids(a[:1], np.array([1]))
            _same(r1[0], r2[0], f"no-autoreset step {s}")
            _same(r1[3], r2[3], f"no-autoreset truncated {s}")


def test_determinism_same_seed_same_trajectory_different_seed_different():
    fns = _fns(2)
    a = np.random.default_rng(0).uniform(-1, 1, (5, 2, 7)).astype(np.float32)

    def run(seed):
        with VectorEnv(fns, backend="process") as v:
            out = [v.reset(seed=seed)[0]["image"]]
            out += [v.step(x)[0]["image"] for x in a]
        return np.stack(out)

    first = run(1)
    assert np.array_equal(first, run(1))
    assert not np.array_equal(first, run(2))


# --- async ------------------------------------------------------------------------------------

class SlowEnv(gym.Wrapper):
    """Steps take `delay` seconds: lets a test decide which env finishes first."""

    def __init__(self, env, delay):
        super().__init__(env)
        self.delay = delay

    def step(self, action):
        time.sleep(self.delay)
        return self.env.step(action)


def test_send_recv_returns_first_finished_and_keeps_the_rest():
    delays = [0.6, 0.0, 0.6, 0.0]
    fns = [(lambda i=i: SlowEnv(make_env(TASKS[0], image_size=16, seed=i), delays[i])) for i in range(4)]
    with VectorEnv(fns, backend="process", batch_size=2, num_workers=4) as v:
        v.reset(seed=0)
        v.send(np.zeros((4, 7), np.float32), [0, 1, 2, 3])
        with pytest.raises(RuntimeError, match="still stepping"):
            v.send(np.zeros((1, 7), np.float32), [1])
        obs, rew, term, trunc, info = v.recv()
        assert list(info["env_id"]) == [1, 3] and obs["image"].shape == (2, 16, 16, 3)
        # the fast ones can go again while the slow ones still step
        v.send(np.zeros((2, 7), np.float32), [1, 3])
        got = []
        while len(got) < 4:
            got += list(v.recv(batch_size=1)[4]["env_id"])
        assert sorted(got) == [0, 1, 2, 3]
        with pytest.raises(RuntimeError, match="no batch in flight"):
            v.recv()


def test_recv_takes_the_earliest_finished_and_reports_a_restart_later(tmp_path):
    # env 0 fails after 0.3 s, env 1 finishes at once: both are done when recv(1) looks, and the
    # earlier one (env 1, though its id is larger) comes first; env 0's restart comes with the next recv
    marker = str(tmp_path / "raised")
    fns = [lambda: SlowEnv(RaiseOnStep(make_env(TASKS[0], image_size=16, seed=0), 1, marker), 0.3),
           lambda: make_env(TASKS[1], image_size=16, seed=1)]
    with VectorEnv(fns, backend="process", num_workers=2) as v:
        v.reset(seed=0)
        v.send(np.zeros((2, 7), np.float32), [0, 1])
        time.sleep(1.5)
        with pytest.warns(RuntimeWarning, match="restarted"):
            first = v.recv(batch_size=1)
        assert list(first[4]["env_id"]) == [1] and not first[4]["worker_restarted"].any()
        assert list(v.in_flight) == [0]
        obs, rew, term, trunc, info = v.recv()
        assert list(info["env_id"]) == [0] and info["worker_restarted"][0] and trunc[0] and rew[0] == 0
        assert list(v.restarts) == [1, 0] and not len(v.in_flight)


# --- load balancing: envs move between workers at episode boundaries --------------------------

def _uneven_fns(n, max_episode_steps=12, size=32):
    # even envs cost about 10 ms a step more: at start (env i on worker i % 2) all of them share worker 0
    return [(lambda i=i: SlowEnv(make_env(TASKS[i % len(TASKS)], image_size=size, seed=100 + i,
                                          max_episode_steps=max_episode_steps), 0.01 if i % 2 == 0 else 0.0))
            for i in range(n)]


def _worker_loads(v):
    return np.bincount(v.env_workers, weights=v.step_costs, minlength=v.num_workers)


@pytest.mark.parametrize("with_options", [False, True])
def test_envs_move_to_balance_measured_costs_and_their_episodes_go_on_unchanged(with_options):
    # the moved env's new worker replays its last reset (RNG state, seed, options): every observation,
    # reward and flag stays equal to the in-process run, step by step, through the moves
    def opts(rng):
        return (lambda i: {"init_state": int(rng.integers(4))}) if with_options else None
    fns = _uneven_fns(4)
    with VectorEnv(fns, backend="process", num_workers=2, reset_options=opts(np.random.default_rng(3))) as pv, \
            VectorEnv(fns, backend="inprocess", reset_options=opts(np.random.default_rng(3))) as iv:
        assert list(pv.env_workers) == [0, 1, 0, 1]
        _compare(pv, iv, 60, seed=5)  # moves start once every env has MIN_COST_SAMPLES steps timed
        assert pv.moves >= 1
        loads = _worker_loads(pv)
        assert loads.max() < 1.5 * loads.min(), (pv.env_workers, pv.step_costs)
        assert loads.max() < 0.8 * pv.step_costs[[0, 2]].sum()  # the start's busiest worker


def test_envs_move_while_others_are_in_flight_and_each_trajectory_stays_exact():
    # send/recv one env at a time: a move happens while the other worker's envs are stepping
    fns, n, steps = _uneven_fns(4), 4, 60
    rng = np.random.default_rng(0)
    acts = rng.uniform(-1, 1, (n, steps, 7)).astype(np.float32)
    with VectorEnv(fns, backend="process", num_workers=2) as pv:
        pv.reset(seed=5)
        count = [0] * n
        got = {i: [] for i in range(n)}
        pv.send(acts[:, 0], np.arange(n))
        while len(pv.in_flight):
            obs, rew, term, trunc, info = pv.recv(batch_size=1)
            i = int(info["env_id"][0])
            got[i].append((obs["image"][0], rew[0], term[0], trunc[0]))
            count[i] += 1
            if count[i] < steps:
                pv.send(acts[i, count[i]][None], [i])
        assert pv.moves >= 1
    with VectorEnv(fns, backend="inprocess") as iv:
        iv.reset(seed=5)
        for i in range(n):
            for k in range(steps):
                obs, rew, term, trunc, _ = iv._step_ids(acts[i, k][None], np.array([i]))
                for x, y, name in zip((obs["image"][0], rew[0], term[0], trunc[0]), got[i][k], ("obs", "reward", "term", "trunc")):
                    _same(x, y, f"env {i} step {k} {name}")


class NotReproducible(gym.Wrapper):
    """Marks its reset observation with the process id: a reset no other worker can replay."""

    def reset(self, **kw):
        obs, info = self.env.reset(**kw)
        obs["image"][0, 0, 0] = os.getpid() % 251
        return obs, info


def test_a_move_that_does_not_replay_its_reset_is_reported_and_the_new_episode_returned():
    fns = [(lambda f=f: NotReproducible(f())) for f in _uneven_fns(4, max_episode_steps=10)]
    with VectorEnv(fns, backend="process", num_workers=2) as pv:
        pv.reset(seed=0)
        a = np.zeros((4, 7), np.float32)
        with pytest.warns(RuntimeWarning, match="did not reproduce its reset"):
            for _ in range(60):
                obs = pv.step(a)[0]
                _same(obs, pv.observations(range(4)), "returned obs = the envs' current obs")
        assert pv.moves >= 1
        pids = dict(zip(range(2), pv.worker_pids))
        marks = pv.observations(range(4))["image"][:, 0, 0, 0]
        assert all(m in (pids[0] % 251, pids[1] % 251) for m in marks)


def test_rebalance_off_keeps_the_start_assignment():
    with VectorEnv(_uneven_fns(4), backend="process", num_workers=2, rebalance=False) as pv:
        pv.reset(seed=0)
        for _ in range(60):
            pv.step(np.zeros((4, 7), np.float32))
        assert pv.moves == 0 and list(pv.env_workers) == [0, 1, 0, 1]


# --- bad input --------------------------------------------------------------------------------

def _broken_factory():
    raise RuntimeError("no such robot")


class WrongShapeEnv(gym.Wrapper):
    def reset(self, **kw):
        obs, info = self.env.reset(**kw)
        return {**obs, "image": np.zeros((40, 40, 3), np.uint8)}, info


def test_bad_input_has_clear_errors():
    from vlarl_fast.envs.process_vector import WorkerError
    with pytest.raises(WorkerError, match="failed to build the env(.|\n)*no such robot"):
        VectorEnv([_fns(1)[0], _broken_factory], backend="process")
    with VectorEnv(_fns(2, size=16), backend="process") as v:
        v.reset(seed=0)
        with pytest.raises(ValueError, match=r"actions must have shape \(2, 7\)"):
            v.step(np.zeros((2, 6), np.float32))
        with pytest.raises(TypeError, match="castable to float32"):
            v.step(np.zeros((2, 7), dtype=np.complex64))
        with pytest.raises(ValueError, match="distinct ids"):
            v.send(np.zeros((2, 7), np.float32), [0, 0])
        v.step(np.zeros((2, 7)))  # float64 actions are cast
    with pytest.warns(RuntimeWarning, match="restarted"):
        with pytest.raises(WorkerError, match=r"observation 'image' has shape \(40, 40, 3\)(.|\n)*\(16, 16, 3\)"):
            with VectorEnv([lambda: WrongShapeEnv(make_env(TASKS[0], image_size=16))], backend="process") as v:
                v.reset(seed=0)
    with pytest.raises(ValueError, match="unknown VectorEnv backend"):
        VectorEnv(_fns(1), backend="threads")
    for bad in (0, 3):
        with pytest.raises(ValueError, match=r"num_workers must be between 1 and the number of envs \(2\)"):
            VectorEnv(_fns(2), backend="process", num_workers=bad)


# --- crash recovery ---------------------------------------------------------------------------

def _step_through_failures(pv, iv, a, *, kill_worker: int, healthy: int, warn: dict, restarted_at):
    """Step the process VectorEnv `pv` and the in-process `iv` side by side over actions `a`, killing
    worker `kill_worker` before step 1; `warn[s]`: the restart warning step s must give; env `healthy`
    must equal the reference at every step; `restarted_at(s)`: the expected worker_restarted flags."""
    pv.reset(seed=4)
    iv.reset(seed=4)
    for s in range(len(a)):
        if s == 1:
            os.kill(pv.worker_pids[kill_worker], signal.SIGKILL)  # mid-episode, between steps
        if s in warn:
            with pytest.warns(RuntimeWarning, match=warn[s]):
                r1 = pv.step(a[s])
        else:
            r1 = pv.step(a[s])
        r2 = iv.step(a[s])
        _same(r1[0]["image"][healthy], r2[0]["image"][healthy], f"env {healthy} obs at step {s}")
        assert r1[1][healthy] == r2[1][healthy]
        restarted = r1[4]["worker_restarted"]
        assert list(restarted) == restarted_at(s)
        if restarted.any():
            assert r1[3][restarted].all() and r1[4]["done"][restarted].all() and "final_obs" in r1[4]
            assert (r1[1][restarted] == 0).all()


def test_worker_killed_or_raising_is_restarted_others_unaffected(tmp_path):
    marker = str(tmp_path / "raised")
    fns = _fns(3)
    faulty = fns[:2] + [lambda: RaiseOnStep(make_env(TASKS[2 % len(TASKS)], image_size=32, seed=102), 3, marker)]
    a = np.random.default_rng(0).uniform(-1, 1, (6, 3, 7)).astype(np.float32)
    with VectorEnv(faulty, backend="process", num_workers=3) as pv, VectorEnv(fns, backend="inprocess") as iv:
        _step_through_failures(pv, iv, a, kill_worker=0, healthy=1,
                               warn={1: "signal 9", 2: "FloatingPointError"},
                               restarted_at=lambda s: [s == 1, False, s == 2])
        assert list(pv.restarts) == [1, 0, 1]
        pids = pv.worker_pids
    assert not any(_alive(p) for p in pids)


def test_shared_worker_killed_takes_its_envs_a_raising_env_only_itself(tmp_path):
    # 4 envs on 2 workers: worker 0 serves envs 0 and 2, worker 1 envs 1 and 3
    marker = str(tmp_path / "raised")
    fns = _fns(4)
    faulty = fns[:2] + [lambda: RaiseOnStep(make_env(TASKS[2], image_size=32, seed=102), 3, marker), fns[3]]
    a = np.random.default_rng(1).uniform(-1, 1, (6, 4, 7)).astype(np.float32)
    with VectorEnv(faulty, backend="process", num_workers=2) as pv, VectorEnv(fns, backend="inprocess") as iv:
        assert list(pv.env_workers) == [0, 1, 0, 1]
        pid0 = pv.worker_pids[0]
        # env 0 shares its worker with the raising env 2, and never failed itself
        _step_through_failures(pv, iv, a, kill_worker=1, healthy=0,
                               warn={1: r"signal 9(.|\n)*envs \[1, 3\]",
                                     2: "env 2 restarted in its worker(.|\n)*FloatingPointError"},
                               restarted_at=lambda s: [False, s == 1, s == 2, s == 1])
        assert list(pv.restarts) == [0, 1, 1, 1]
        assert pv.worker_pids[0] == pid0  # the raising env was rebuilt inside its worker

        # an env that was idle when its worker died reports the restart at its next step
        victim = pv.worker_pids[1]
        os.kill(victim, signal.SIGKILL)
        while _alive(victim):
            time.sleep(0.01)
        pv.send(a[0, :1], [1])
        with pytest.warns(RuntimeWarning, match="signal 9"):
            info = pv.recv()[4]
        assert list(info["env_id"]) == [1] and info["worker_restarted"][0]
        obs, rew, term, trunc, info = pv._step_ids(a[1, :2], np.array([0, 3]))
        assert list(info["worker_restarted"]) == [False, True] and trunc[1] and not trunc[0]
        assert list(pv._step_ids(a[2, :1], np.array([3]))[4]["worker_restarted"]) == [False]
        pids = pv.worker_pids
    assert not any(_alive(p) for p in pids)


def test_hanging_step_is_killed_after_step_timeout():
    fns = [lambda: SlowEnv(make_env(TASKS[0], image_size=16, seed=0), 30.0), _fns(1, size=16)[0]]
    with VectorEnv(fns, backend="process", step_timeout=1.0, num_workers=2) as v:
        v.reset(seed=0)
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="timed out"):
            _, _, _, trunc, info = v.step(np.zeros((2, 7), np.float32))
        assert time.monotonic() - t0 < 10
        assert list(info["worker_restarted"]) == [True, False] and trunc[0]


# --- no leftover processes --------------------------------------------------------------------

def test_close_leaves_no_processes_and_no_shared_memory():
    v = VectorEnv(_fns(2, size=16), backend="process")
    pids, name = v.worker_pids, v.batch.name
    # unlinked as soon as it exists: the workers hold it through descriptors, nothing can leak
    assert not os.path.exists("/dev/shm/" + name.lstrip("/")) and not v.batch.owner
    v.reset(seed=0)
    v.step(np.zeros((2, 7), np.float32))
    v.close()
    v.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    assert not os.path.exists("/dev/shm/" + name.lstrip("/"))
    with pytest.raises(RuntimeError, match="closed"):
        v.step(np.zeros((2, 7), np.float32))


@pytest.mark.parametrize("mode,sig", [("close", signal.SIGINT), ("noclose", signal.SIGINT), ("noclose", signal.SIGKILL)])
def test_ctrl_c_and_killed_manager_leave_no_processes(tmp_path, mode, sig):
    script = textwrap.dedent(f"""
        import faulthandler, signal, sys, time, numpy as np
        from vlarl_fast.envs import VectorEnv, make_env
        if __name__ == "__main__":
            # Ctrl-C as an interactive session has it: a test run started in the background by a
            # non-interactive shell hands its children SIGINT ignored, and Python then never raises
            # KeyboardInterrupt (the manager would step on forever)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            # a manager that hangs on its way out dumps every thread's stack and exits (diagnosis for CI)
            faulthandler.dump_traceback_later(45, exit=True)
            fns = [(lambda i=i: make_env({TASKS[0]!r}, image_size=16, seed=i)) for i in range(2)]
            v = VectorEnv(fns, backend="process", num_workers=2)
            v.reset(seed=0)
            print(v.batch.name, " ".join(map(str, v.worker_pids)), flush=True)
            try:
                while True:
                    v.step(np.zeros((2, 7), np.float32))
            finally:
                if sys.argv[1] == "close":
                    v.close()
    """)
    path = tmp_path / "run.py"
    path.write_text(script)
    for mode, sig in ((mode, sig),):
        p = subprocess.Popen([sys.executable, str(path), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            name, *pids = p.stdout.readline().split()
            pids = [int(x) for x in pids]
            assert len(pids) == 2, p.stderr.read()
            time.sleep(0.3)
            p.send_signal(sig)
            p.wait(60)
            err = p.stderr.read()
            if "Timeout (0:00:45)!" in err:
                warnings.warn(f"manager hung after {sig!r} ({mode}); its stacks:\n{err[-6000:]}")
                pytest.fail(f"manager hung after {sig!r} ({mode})")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        deadline = time.monotonic() + 10
        while any(_alive(q) for q in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(q) for q in pids), (mode, sig)
        from vlarl_fast._C import SharedBatch
        # not even a manager killed by SIGKILL leaves its batch's name: it was unlinked at creation
        assert SharedBatch.remove(name) is False, (mode, sig)
