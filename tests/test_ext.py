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


DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
          "float64"]
# 0-d, 1-d and odd multi-dimensional slots (4 dimensions is the most a field may have)
ODD_SHAPES = {"scalar": (), "one": (1,), "vec": (7,), "odd": (3, 1, 5), "four": (2, 3, 1, 3)}


def _values(dtype, shape, rng):
    """Values that use the whole range of dtype: a wrong itemsize, offset or byte order shows up."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random(shape) < 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        v = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
        if v.size >= 2:
            v.flat[0], v.flat[-1] = info.min, info.max
        return v
    return (rng.standard_normal(shape) * 1e3).astype(dt)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_between_handles(dtype):
    """Create, attach by name and by descriptor, and view a batch of each supported dtype: exact dtypes
    and shapes, values written through one handle read back through the others, views zero-copy."""
    from vlarl_fast._C import SharedBatch
    rng = np.random.default_rng(DTYPES.index(dtype))
    dt = np.dtype(dtype)
    num_envs = 3
    fields = {k: (dtype, shape) for k, shape in ODD_SHAPES.items()}
    fields["pad"] = ("uint8", (5,))      # a field of another dtype between them
    with SharedBatch.create(_name(), num_envs, fields) as owner:
        by_name = SharedBatch.attach(owner.name)
        by_fd = SharedBatch.attach_fd(owner.fileno())
        handles = (owner, by_name, by_fd)
        for h in handles:
            assert h.fields == {k: (np.dtype(d), tuple(s)) for k, (d, s) in fields.items()}
            for k, shape in ODD_SHAPES.items():
                full, slot = h.array(k), h.slot(k, 1)
                assert full.dtype == dt and full.dtype.isnative and full.shape == (num_envs, *shape)
                assert slot.dtype == dt and slot.shape == shape
                assert full.flags.writeable and full.flags.c_contiguous and slot.flags.writeable
                assert full.base is h and slot.base is h
                assert slot.ctypes.data == full[1, ...].ctypes.data and np.shares_memory(slot, full)
        for k, shape in ODD_SHAPES.items():
            expect = np.stack([_values(dtype, shape, rng) for _ in range(num_envs)])
            for env in range(num_envs):            # each env written through a different handle
                handles[env].write(k, env, expect[env])
            for h in handles:
                np.testing.assert_array_equal(h.array(k), expect)
                for env in range(num_envs):
                    np.testing.assert_array_equal(h.slot(k, env), expect[env])
                    np.testing.assert_array_equal(h[k][env], expect[env])
            # a write through a view shows in another handle's view: the same memory, no copies
            new = _values(dtype, shape, rng)
            by_fd.slot(k, 2)[...] = new
            np.testing.assert_array_equal(owner.array(k)[2], new)
            np.testing.assert_array_equal(by_name.slot(k, 2), new)
            owner.array(k)[0] = expect[1]
            np.testing.assert_array_equal(by_fd.slot(k, 0), expect[1])
        assert (owner.array("pad") == 0).all()      # the neighbours' writes stayed in their fields
        scalar = by_name.slot("scalar", 0)
        assert scalar.shape == () and scalar.ndim == 0
        scalar[...] = _values(dtype, (), rng)
        assert owner.array("scalar")[0] == scalar[()]
        by_name.close()
        by_fd.close()


@needs_ext
@pytest.mark.parametrize("dtype", ["bool", "uint16", "float64"])
def test_views_outlive_the_batch_object_and_keep_it_alive(dtype):
    import gc

    from vlarl_fast._C import SharedBatch
    name = _name()
    b = SharedBatch.create(name, 2, {"x": (dtype, (3, 2)), "s": (dtype, ())})
    full, slot, scalar = b.array("x"), b.slot("x", 1), b.slot("s", 0)
    part = full[1:, ::2]                              # a view of a view: still rooted in the batch
    values = _values(dtype, (2, 3, 2), np.random.default_rng(1))
    full[...] = values
    del b
    gc.collect()
    assert _shm_exists(name)                          # the views hold the batch: not destroyed, not unlinked
    np.testing.assert_array_equal(slot, values[1])
    slot[0] = values[0, 0]
    np.testing.assert_array_equal(full[1, 0], values[0, 0])
    np.testing.assert_array_equal(part, full[1:, ::2])
    scalar[...] = values.flat[0]
    assert scalar.dtype == np.dtype(dtype) and scalar.shape == ()
    del full, slot
    gc.collect()
    assert _shm_exists(name)                          # `part` and `scalar` still hold it
    del part, scalar
    gc.collect()
    assert not _shm_exists(name)                      # the last view gone: the batch is destroyed


@needs_ext
@pytest.mark.parametrize("spec", [
    *[np.dtype(d).newbyteorder().str for d in DTYPES if np.dtype(d).itemsize > 1],   # non-native byte order
    [("a", "f4")], [("a", "u1"), ("b", "i8")], np.dtype([("a", "f4")]),          # structured
    ("f4", (2,)), "complex64", "complex128", "U4", "S3", "O", "M8[s]", "m8[s]", "V8", "longdouble",
])
def test_unsupported_dtypes_are_rejected(spec):
    from vlarl_fast._C import SharedBatch
    with pytest.raises(TypeError, match=r"unsupported dtype .*; use one of bool, int8"):
        SharedBatch.create(_name(), 2, {"x": (spec, (2,))})


@needs_ext
@pytest.mark.parametrize("spec,expect", [("?", "bool"), (np.float32, "float32"), (bool, "bool"), (int, "int64"),
                                         (float, "float64"), ("=u2", "uint16"), ("<f8", "float64"),
                                         ("i1", "int8"), ("q", "int64"), (np.dtype("H"), "uint16")])
def test_dtype_specs_numpy_accepts(spec, expect):
    from vlarl_fast._C import SharedBatch
    if np.dtype(spec) != np.dtype(expect):                  # e.g. `int` on a platform with a 32-bit long
        pytest.skip(f"{spec!r} is {np.dtype(spec)} here")
    with SharedBatch.create(None, 2, {"x": (spec, (2,))}) as b:
        assert b.array("x").dtype == np.dtype(expect) and b.fields["x"][0] == np.dtype(expect)


@needs_ext
def test_env_ids_of_any_integer_kind_and_layout():
    from vlarl_fast._C import SharedBatch
    with SharedBatch.create(None, 6, {"x": ("float32", ())}) as b:
        cases = [[4, 1], (4, 1), range(4, 0, -3), np.array([4, 1], np.int64), np.array([4, 9, 1], np.int64)[::2],
                 np.array([4, 1], ">i8"), np.array([4, 1], "<i8"), *[np.array([4, 1], d) for d in DTYPES[1:9]],
                 memoryview(np.array([4, 1], np.int64))]
        for ids in cases:
            b.set_states(range(6), FREE)
            b.set_states(ids, READY)
            assert b.states().tolist() == [0, READY, 0, 0, READY, 0], ids
            got = b.wait_slots(ids, READY, timeout=0)
            assert sorted(got.tolist()) == [1, 4] and got.dtype == np.int64, ids
        b.set_states([], READY)
        assert b.wait_slots(np.array([], np.int64), READY).tolist() == []
        for bad in (np.array([0, 1], np.float64), np.array([True]), ["a"], [1.0]):
            with pytest.raises(TypeError, match="env_ids must be integers"):
                b.set_states(bad, READY)
        for bad in (np.zeros((2, 1), np.int64), np.int64(1), 3, b"\x00\x01"):
            with pytest.raises(ValueError, match="1-D"):
                b.wait_slots(bad, READY)
        with pytest.raises(IndexError, match="env -1 out of range"):
            b.set_states(np.array([-1], np.int64), READY)
        with pytest.raises(IndexError, match="env 6 out of range"):
            b.set_states(np.array([6], np.uint8), READY)


@needs_ext
def test_copies_are_fresh_numpy_arrays():
    from vlarl_fast._C import SharedBatch
    with SharedBatch.create(None, 5, {"x": ("float32", ())}) as b:
        b.set_states([3, 0], READY)
        for arr, dtype in ((b.states(), np.uint32), (b.stamps(), np.uint32), (b.wait_slots([3, 0], READY), np.int64)):
            assert type(arr) is np.ndarray and arr.dtype == dtype and arr.flags.writeable and arr.flags.owndata
        assert b.states().tolist() == [READY, 0, 0, READY, 0] and b.stamps().tolist() == [1, 0, 0, 0, 0]
        assert b.wait_slots([3, 0], READY).tolist() == [3, 0]
        s = b.states()
        s[:] = 7                                     # a copy: the batch is untouched
        assert b.state(0) == READY
    with pytest.raises(RuntimeError, match="closed"):
        b.states()


@needs_ext
def test_batch_exports_its_memory_through_the_buffer_protocol():
    from vlarl_fast._C import SharedBatch
    b = SharedBatch.create(None, 2, {"x": ("uint16", (3,))})
    m = memoryview(b)
    assert m.nbytes == b.nbytes and m.format == "B" and not m.readonly and m.obj is b
    x = b.array("x")
    x[1] = [1, 2, 3]
    off = x.ctypes.data - np.frombuffer(m, np.uint8).ctypes.data
    np.testing.assert_array_equal(np.frombuffer(m, np.uint16, count=6, offset=off).reshape(2, 3), x)
    m.release()
    b.close()
    with pytest.raises(BufferError, match="closed"):
        memoryview(b)
    with pytest.raises(BufferError, match="closed"):
        np.frombuffer(b, np.uint8)
    x[0] = 9                                         # views taken before close stay valid
    assert x[0].tolist() == [9, 9, 9]


@needs_ext
def test_extension_does_not_use_numpys_c_api():
    """The extension reaches numpy only through its Python API and the buffer protocol: numpy's C structs
    change layout between releases, so an extension compiled against one numpy would crash under another.
    An extension built on numpy's C API (through pybind11's numpy header) imports numpy's _ARRAY_API table."""
    from vlarl_fast import _C
    binary = Path(_C.__file__).read_bytes()
    assert b"_ARRAY_API" not in binary and b"multiarray" not in binary
    source = CSRC / "bindings.cpp"
    if source.exists():
        import re
        text = source.read_text()
        assert not re.search(r'#\s*include\s*[<"]pybind11/numpy\.h', text)
        assert not re.search(r"\bpy::(array|array_t|dtype)\b", text)


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
