"""The compiled shared-memory batch: zero-copy views, cross-process attach and futex waits."""
import multiprocessing as mp
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from vlarl_fast._ext import EXT_AVAILABLE, EXT_ERROR

pytestmark = pytest.mark.skipif(not EXT_AVAILABLE, reason=f"extension not built: {EXT_ERROR}")


def _name():
    return f"/vlarl_pytest_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def _fields():
    return {"image": ("uint8", (6, 5, 3)), "state": ("float32", (8,)), "reward": ("float32", ()),
            "done": ("bool", ())}


def _child(name, env):
    from vlarl_fast._C import SharedBatch
    b = SharedBatch.attach(name)
    img = b.slot("image", env)
    img[...] = env + 7
    b.array("reward")[env] = 1.5 * env
    b.array("state")[env] = np.arange(8, dtype=np.float32)
    b.set_state(env, 1)


def test_views_are_zero_copy_and_aligned():
    from vlarl_fast._C import SharedBatch
    b = SharedBatch.create(_name(), 4, _fields())
    img = b.array("image")
    assert img.shape == (4, 6, 5, 3) and img.dtype == np.uint8
    assert b.array("reward").shape == (4,) and b.array("done").dtype == np.bool_
    for f in _fields():
        assert b.array(f).ctypes.data % 64 == 0
    img[2] = 9
    assert np.shares_memory(b.slot("image", 2), img)
    assert (b.slot("image", 2) == 9).all() and (b.slot("image", 1) == 0).all()
    assert img.base is not None
    b.close()


def test_spawned_child_writes_in_place():
    from vlarl_fast._C import SharedBatch
    name = _name()
    b = SharedBatch.create(name, 3, _fields())
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(name, i)) for i in (0, 2)]
    for p in procs:
        p.start()
    assert b.wait(0, 1, timeout=60) and b.wait(2, 1, timeout=60)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert (b.array("image")[0] == 7).all() and (b.array("image")[2] == 9).all()
    assert (b.array("image")[1] == 0).all() and b.state(1) == 0
    np.testing.assert_array_equal(b.array("reward"), [0.0, 0.0, 3.0])
    b.close()


def test_timeouts_errors_and_unlink():
    from vlarl_fast._C import SharedBatch
    name = _name()
    b = SharedBatch.create(name, 2, _fields())
    t0 = time.perf_counter()
    assert b.wait(1, 5, timeout=0.05) is False
    assert b.wait_all(3, timeout=0.05) is False
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(KeyError):
        b.array("nope")
    with pytest.raises(IndexError):
        b.slot("image", 2)
    with pytest.raises(RuntimeError):
        SharedBatch.create(name, 2, _fields())  # name taken
    with pytest.raises(TypeError, match="unsupported dtype"):
        SharedBatch.create(_name(), 2, {"x": ("complex64", ())})
    with pytest.raises(ValueError):
        SharedBatch.create(_name(), 0, _fields())
    other = SharedBatch.attach(name)
    assert not other.owner and other.fields["state"][1] == (8,)
    other.close()
    b.close()
    with pytest.raises(RuntimeError, match="no shared batch"):
        SharedBatch.attach(name)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_cpp_unit_test(tmp_path):
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    if not (csrc / "test_shm_batch.cpp").exists():
        pytest.skip("C++ sources not next to the tests")
    exe = tmp_path / "test_shm_batch"
    subprocess.run(["g++", "-std=c++17", "-O1", "-UNDEBUG", f"-I{csrc}", str(csrc / "test_shm_batch.cpp"),
                    "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "all passed" in out.stdout
