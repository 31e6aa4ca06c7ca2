"""The compiled shared-memory batch (vlarl_fast._C): zero-copy views, 64-byte alignment, attach by
name from spawned processes, futex waits with the GIL released, timeouts, errors, unlink on close;
and the C++ unit test of the headers, compiled here with the system compiler and through CMake."""
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from vlarl_fast._ext import EXT_AVAILABLE, EXT_ERROR

needs_ext = pytest.mark.skipif(not EXT_AVAILABLE, reason=f"extension not built: {EXT_ERROR}")
CSRC = Path(__file__).resolve().parents[1] / "csrc"
FREE, READY, CONSUMED = 0, 1, 2


def _name():
    return f"/vlarl_pytest_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def _fields():
    return {"image": ("uint8", (6, 5, 3)), "state": (np.float32, (8,)), "reward": ("float32", ()),
            "done": (bool, ()), "tokens": ("int64", 7)}


def _shm_exists(name):
    return os.path.exists("/dev/shm/" + name.lstrip("/"))


# --- children (module level: a spawned process imports this module to find them) ---------------

def _child_by_name(name, env):
    from vlarl_fast._C import SharedBatch
    b = SharedBatch.attach(name)
    b.slot("image", env)[...] = env + 7            # in place, through a view
    b.array("reward")[env] = 1.5 * env
    b.write("state", env, np.arange(8, dtype=np.float64))  # same-kind cast float64 -> float32
    b.set_state(env, READY)
    assert b.wait(env, CONSUMED, timeout=60)         # the manager hands the slot back
    b.write("tokens", env, np.full(7, 100 + env))
    b.set_state(env, READY)


def _child_pickled(batch, env, delay):
    time.sleep(delay)
    assert not batch.owner
    batch.write("reward", env, float(env))
    batch.set_state(env, READY)


# --- the Python API -----------------------------------------------------------------------------

@needs_ext
def test_views_are_zero_copy_and_aligned():
    from vlarl_fast._C import ALIGNMENT, SharedBatch
    with SharedBatch.create(_name(), 4, _fields()) as b:
        img = b.array("image")
        assert img.shape == (4, 6, 5, 3) and img.dtype == np.uint8 and img.flags.writeable
        assert b["reward"].shape == (4,) and b.array("done").dtype == np.bool_
        assert b.array("tokens").shape == (4, 7) and b.array("tokens").dtype == np.int64
        for f in _fields():
            assert b.array(f).ctypes.data % ALIGNMENT == 0 and b.array(f).flags.c_contiguous
        img[2] = 9
        s = b.slot("image", 2)
        assert np.shares_memory(s, img) and s.ctypes.data == img[2].ctypes.data
        assert (s == 9).all() and (b.slot("image", 1) == 0).all()
        assert img.base is b and s.base is b            # the batch keeps the memory alive
        assert b.fields["state"] == (np.dtype(np.float32), (8,)) and b.fields["reward"][1] == ()
        assert b.nbytes % ALIGNMENT == 0 and "image" in repr(b)


@needs_ext
def test_spawned_children_attach_by_name_and_write_in_place():
    from vlarl_fast._C import SharedBatch
    name = _name()
    b = SharedBatch.create(name, 3, _fields())
    img_view = b.array("image")  # taken before the children write: must see their writes
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child_by_name, args=(name, i)) for i in (0, 2)]
    for p in procs:
        p.start()
    try:
        assert b.wait(0, READY, timeout=120) and b.wait(2, READY, timeout=120)
        assert (img_view[0] == 7).all() and (img_view[2] == 9).all()
        assert (img_view[1] == 0).all() and b.state(1) == FREE
        np.testing.assert_array_equal(b.array("reward"), [0.0, 0.0, 3.0])
        np.testing.assert_array_equal(b.array("state")[2], np.arange(8))
        for env in (0, 2):   # ready -> consumed hand-back, then the second publish
            assert b.compare_exchange(env, READY, CONSUMED)
        assert sorted(b.wait_any(READY, min_count=2, timeout=60)) == [0, 2]
        np.testing.assert_array_equal(b.array("tokens")[[0, 2]], [[100] * 7, [102] * 7])
        np.testing.assert_array_equal(b.states(), [READY, FREE, READY])
    finally:
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    b.close()


@needs_ext
def test_batch_pickles_by_name_and_wait_any_returns_early():
    from vlarl_fast._C import SharedBatch
    b = SharedBatch.create(None, 4, {"reward": ("float32", ())})   # a unique name is picked
    assert b.name.startswith("/vlarl_") and b.owner
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_child_pickled, args=(b, 3, 0.2))   # pickled: the child attaches by name
    p.start()
    try:
        t0 = time.perf_counter()
        assert b.wait_any(READY, timeout=120) == [3]
        assert time.perf_counter() - t0 < 60
        assert b.array("reward")[3] == 3.0
    finally:
        p.join(30)
    assert p.exitcode == 0
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        pickle.dumps(b)


@needs_ext
def test_waits_release_the_gil():
    from vlarl_fast._C import SharedBatch
    with SharedBatch.create(_name(), 2, {"x": ("float32", ())}) as b:
        def publish():  # a Python thread can only run this while the main thread waits without the GIL
            time.sleep(0.1)
            b.array("x")[1] = 4.0
            b.set_state(1, READY)
        t = threading.Thread(target=publish)
        t.start()
        assert b.wait(1, READY, timeout=30)
        t.join()
        assert b.array("x")[1] == 4.0
        t = threading.Thread(target=lambda: (time.sleep(0.1), b.set_state(0, READY)))
        t.start()
        assert b.wait_all(READY, timeout=30)
        t.join()


@needs_ext
def test_timeouts_return_cleanly_and_signals_interrupt():
    from vlarl_fast._C import SharedBatch
    with SharedBatch.create(_name(), 3, {"x": ("float32", ())}) as b:
        t0 = time.perf_counter()
        assert b.wait(1, READY, timeout=0.05) is False
        assert b.wait_all(READY, timeout=0.05) is False
        assert b.wait_any(READY, timeout=0.05) == []
        assert b.wait(1, READY, timeout=0) is False
        elapsed = time.perf_counter() - t0
        assert 0.1 <= elapsed < 5.0
        b.set_state(2, READY)
        assert b.wait_any(READY, min_count=2, timeout=0.05) == [2]   # fewer than asked, on timeout
        assert b.wait(2, READY, timeout=0) is True
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            def boom(*_):
                raise KeyboardInterrupt
            old = signal.signal(signal.SIGALRM, boom)
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.2)
                t0 = time.perf_counter()
                with pytest.raises(KeyboardInterrupt):
                    b.wait(0, READY)          # no timeout: only the signal ends it
                assert time.perf_counter() - t0 < 5.0
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)


@needs_ext
def test_errors_name_the_problem():
    from vlarl_fast._C import SharedBatch
    name = _name()
    with SharedBatch.create(name, 2, _fields()) as b:
        with pytest.raises(KeyError, match="fields: image"):
            b.array("nope")
        with pytest.raises(IndexError):
            b.slot("image", 2)
        with pytest.raises(IndexError):
            b.state(-1)
        with pytest.raises(RuntimeError, match="already exists"):
            SharedBatch.create(name, 2, _fields())
        with pytest.raises(ValueError, match=r"holds \(6, 5, 3\) per env, got shape \(6, 5\)"):
            b.write("image", 0, np.zeros((6, 5), np.uint8))
        with pytest.raises(TypeError, match="cannot write float64 into uint8"):
            b.write("image", 0, np.zeros((6, 5, 3)))
        with pytest.raises(TypeError, match="cannot write"):
            b.write("tokens", 0, np.zeros(7, np.float32))   # float into int: not the same kind
        b.write("reward", 1, 2.5)                            # a Python float into a float32 scalar slot
        assert b.array("reward")[1] == 2.5
    for bad_dtype in ("complex64", "U4", ">f4", [("a", "f4")]):
        with pytest.raises(TypeError, match="unsupported dtype"):
            SharedBatch.create(_name(), 2, {"x": (bad_dtype, ())})
    with pytest.raises(ValueError, match="num_envs"):
        SharedBatch.create(_name(), 0, _fields())
    with pytest.raises(ValueError, match="dimension"):
        SharedBatch.create(_name(), 2, {"x": ("float32", (3, 0))})
    with pytest.raises(ValueError, match="more than 4"):
        SharedBatch.create(_name(), 2, {"x": ("float32", (1, 1, 1, 1, 1))})
    with pytest.raises(ValueError, match="expected \\(dtype, shape\\)"):
        SharedBatch.create(_name(), 2, {"x": "float32"})
    with pytest.raises(ValueError, match="without '/'"):
        SharedBatch.create("/a/b", 2, {"x": ("float32", ())})
    with pytest.raises(RuntimeError, match="no shared batch"):
        SharedBatch.attach(_name())


@needs_ext
def test_unlink_on_close_and_views_outlive_it():
    from vlarl_fast._C import SharedBatch
    name = _name()
    b = SharedBatch.create(name, 2, {"x": ("float32", (3,))})
    view = b.array("x")
    other = SharedBatch.attach(name)
    assert not other.owner and other.fields["x"][1] == (3,) and _shm_exists(name)
    other.close()                           # a non-owner close leaves the batch alone
    assert _shm_exists(name) and SharedBatch.attach(name).num_envs == 2
    b.close()
    assert b.closed and not b.owner and not _shm_exists(name)
    with pytest.raises(RuntimeError, match="no shared batch"):
        SharedBatch.attach(name)
    with pytest.raises(RuntimeError, match="closed"):
        b.array("x")
    with pytest.raises(RuntimeError, match="closed"):
        b.wait(0, 1, timeout=0)
    view[1] = 5.0                            # still mapped: the view holds the batch
    assert view[1].tolist() == [5.0] * 3
    b.close()                                # idempotent
    del b
    assert view.sum() == 15.0

    name2 = _name()
    SharedBatch.create(name2, 1, {"x": ("float32", ())})   # dropped at once: unlinked by the destructor
    assert not _shm_exists(name2)
    assert SharedBatch.remove(name2) is False


def _ready_reference(batch, ids, value):
    """The readable path beside wait_slots: scan the listed slots, oldest state change first
    (ages against the current stamp counter, ties by id)."""
    states, stamps = batch.states(), batch.stamps().astype(np.int64)
    ready = [i for i in ids if states[i] == value]
    newest = max(stamps) if len(stamps) else 0
    return sorted(ready, key=lambda i: (-(newest - stamps[i]), i))


def _child_by_descriptor(conn, env):
    from multiprocessing.reduction import recv_handle
    from vlarl_fast._C import SharedBatch
    fd = recv_handle(conn)
    b = SharedBatch.attach_fd(fd)
    os.close(fd)                                     # the batch keeps its own descriptor
    b.array("reward")[env] = 10.0 + env
    b.set_state(env, READY)
    assert b.wait(env, CONSUMED, timeout=60)
    b.set_state(env, READY)


@needs_ext
def test_set_states_and_wait_slots_match_their_readable_paths():
    from vlarl_fast._C import SharedBatch
    rng = np.random.default_rng(0)
    with SharedBatch.create(None, 9, {"x": ("float32", ())}) as fast, \
            SharedBatch.create(None, 9, {"x": ("float32", ())}) as slow:
        for _ in range(30):
            ids = rng.permutation(9)[: rng.integers(0, 10)]
            value = int(rng.integers(0, 3))
            fast.set_states(ids, value)                 # one call
            for i in ids:                               # the readable path: one slot at a time
                slow.set_state(int(i), value)
            np.testing.assert_array_equal(fast.states(), slow.states())
            np.testing.assert_array_equal(fast.stamps(), slow.stamps())
            subset = rng.permutation(9)[: rng.integers(1, 10)].tolist()
            want = int(rng.integers(0, 3))
            got = fast.wait_slots(subset, want, min_count=0)
            assert got.dtype == np.int64 and got.tolist() == _ready_reference(fast, subset, want)
        fast.set_states(range(9), FREE)
        fast.set_states([4, 1, 7], READY)               # finish order 4, 1, 7 ...
        fast.set_state(1, FREE)
        fast.set_state(1, READY)                        # ... 1 again: now the newest
        assert fast.wait_slots(range(9), READY, min_count=3, timeout=0).tolist()[:3] == [4, 7, 1]
        assert fast.wait_slots(np.array([7, 1], np.uint8), READY).tolist() == [7, 1]
        assert fast.wait_slots([0, 2], READY, min_count=1, timeout=0.02).tolist() == []  # timed out
        before = fast.states()
        with pytest.raises(IndexError, match="env 9 out of range"):
            fast.set_states([0, 9], CONSUMED)
        np.testing.assert_array_equal(fast.states(), before)   # checked before anything changed
        with pytest.raises(TypeError, match="env_ids must be integers"):
            fast.wait_slots([0.5], READY)
        with pytest.raises(ValueError, match="1-D"):
            fast.set_states([[0, 1]], READY)


@needs_ext
def test_wait_slots_wakes_on_the_last_of_a_set_and_releases_the_gil():
    from vlarl_fast._C import SharedBatch
    with SharedBatch.create(_name(), 6, {"x": ("float32", ())}) as b:
        def publish():   # runs only while the main thread waits without the GIL
            for i in (5, 0, 3):
                time.sleep(0.02)
                b.set_state(i, READY)
        t = threading.Thread(target=publish)
        t.start()
        assert b.wait_slots([0, 3, 5], READY, timeout=30).tolist() == [5, 0, 3]
        t.join()
        # a worker's round trip: publish, then wait for the next command
        t = threading.Thread(target=lambda: (time.sleep(0.05), b.set_state(2, CONSUMED)))
        t.start()
        assert b.publish_and_wait(2, READY, CONSUMED, timeout=30) and b.state(2) == CONSUMED
        t.join()


@needs_ext
def test_unlinked_batch_still_reaches_processes_through_its_descriptor():
    from multiprocessing.reduction import send_handle
    from vlarl_fast._C import SharedBatch
    name = _name()
    b = SharedBatch.create(name, 2, {"reward": ("float32", ())})
    b.unlink()                                      # before any other process has it
    assert not _shm_exists(name) and not b.owner and not b.closed
    with pytest.raises(RuntimeError, match="no shared batch"):
        SharedBatch.attach(name)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child_by_descriptor, args=(child, 1))
    p.start()
    try:
        send_handle(parent, b.fileno(), p.pid)
        assert b.wait(1, READY, timeout=120)
        assert b.array("reward")[1] == 11.0
        assert b.compare_exchange(1, READY, CONSUMED)
        assert b.wait_slots([1], READY, timeout=60).tolist() == [1]
    finally:
        p.join(30)
    assert p.exitcode == 0
    b.unlink()                                      # idempotent
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.fileno()
    with pytest.raises(RuntimeError, match="not open"):
        SharedBatch.attach_fd(10_000)


@needs_ext
def test_build_info():
    from vlarl_fast._ext import build_info
    info = build_info()
    assert info["cxx_standard"] == "C++17" and info["compiler"] and info["build_type"]
    if sys.platform.startswith("linux"):
        assert info["wait"] == "futex"


def test_pure_python_fallback_is_honest():
    code = ("import vlarl_fast._ext as e, vlarl_fast.info as i; assert not e.EXT_AVAILABLE; "
            "print(e.EXT_ERROR); print(i.format_info(i.collect_info()))")
    env = dict(os.environ, VLARL_DISABLE_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "disabled by VLARL_DISABLE_EXT" in r.stdout and "C++ extension NOT usable" in r.stdout


# --- the C++ unit test ----------------------------------------------------------------------------

def _cxx():
    for cc in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


CXX_TESTS = ["test_shm_batch", "test_slot_sync"]


def _run_cxx_test(exe):
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all passed" in out.stdout


@pytest.mark.skipif(_cxx() is None, reason="no C++ compiler")
@pytest.mark.skipif(not (CSRC / "test_shm_batch.cpp").exists(), reason="C++ sources not next to the tests")
@pytest.mark.parametrize("test_name", CXX_TESTS)
def test_cpp_unit_test_with_system_compiler(tmp_path, test_name):
    exe = tmp_path / test_name
    libs = ["-lrt"] if sys.platform.startswith("linux") else []
    subprocess.run([_cxx(), "-std=c++17", "-O1", "-Wall", "-UNDEBUG", f"-I{CSRC}", str(CSRC / f"{test_name}.cpp"),
                    "-o", str(exe), "-pthread", *libs], check=True, timeout=300)
    _run_cxx_test(exe)


@pytest.mark.skipif(_cxx() is None or shutil.which("cmake") is None, reason="no C++ compiler or cmake")
@pytest.mark.skipif(not (CSRC / "test_shm_batch.cpp").exists(), reason="C++ sources not next to the tests")
def test_cpp_unit_tests_cmake_targets(tmp_path):
    """The optional CMake targets (-DVLARL_BUILD_TESTS=ON), configured without Python or pybind11."""
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(CSRC.parent), "-B", str(build), "-DVLARL_BUILD_TESTS=ON",
                    "-DVLARL_BUILD_EXTENSION=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True, timeout=300)
    subprocess.run(["cmake", "--build", str(build), "--target", *CXX_TESTS], check=True, capture_output=True,
                   timeout=600)
    for name in CXX_TESTS:
        _run_cxx_test(next(p for p in build.rglob(name) if p.is_file() and os.access(p, os.X_OK)))
