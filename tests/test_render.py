import os
import subprocess
import sys

import numpy as np
import pytest

from vlarl_fast.envs.render import backend_report, missing_backend_message, select_backend


def test_missing_backend_message_names_debian_packages():
    msg = missing_backend_message({"egl": "EGLError", "osmesa": "ImportError"})
    assert "apt-get install libegl1 libgl1-mesa-dri" in msg
    assert "apt-get install libosmesa6" in msg
    assert "MUJOCO_GL" in msg


def test_a_backend_is_selected_here():
    assert select_backend() in ("egl", "osmesa", "glfw")
    rep = backend_report()
    assert rep["works"] and rep["error"] is None


def test_triton_import_after_rendering_does_not_crash():
    # a fresh process: render first, then import triton (as torch/transformers do lazily)
    pytest.importorskip("triton")
    code = ("from vlarl_fast.envs import make_env\n"
            "make_env('tabletop/reach_red', image_size=32, seed=0).reset(seed=0)\n"
            "import triton\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


# ---- render devices of env workers ---------------------------------------------------------------
from vlarl_fast._ext import EXT_AVAILABLE  # noqa: E402

needs_ext = pytest.mark.skipif(not EXT_AVAILABLE, reason="the worker-process VectorEnv needs the compiled extension")


def _reach(size=32):
    from vlarl_fast.envs import make_env
    return lambda: make_env("tabletop/reach_red", image_size=size, seed=0)


def _raise_fatal():
    import mujoco
    raise mujoco.FatalError("Offscreen framebuffer is not complete, error 0x8cdd")


def _raise_value():
    raise ValueError("unknown shaping option")


def _cpu_rendering_installed() -> bool:
    import ctypes.util

    from vlarl_fast.envs.render_devices import query_egl_devices
    try:
        return any(d.software for d in query_egl_devices()) or ctypes.util.find_library("OSMesa") is not None
    except Exception:
        return ctypes.util.find_library("OSMesa") is not None


@needs_ext
@pytest.mark.skipif(not _cpu_rendering_installed(), reason="no Mesa here (neither its EGL software device nor OSMesa)")
def test_workers_render_on_the_cpu_when_asked():
    from vlarl_fast.envs import VectorEnv
    with VectorEnv([_reach()] * 2, backend="process", num_workers=2, render_devices="cpu") as pv, \
            VectorEnv([_reach()] * 2) as iv:
        for env in pv._worker_env:
            assert env["MUJOCO_GL"] in ("egl", "osmesa") and "CUDA_VISIBLE_DEVICES" not in env
        a, b = pv.reset(seed=1)[0]["image"], iv.reset(seed=1)[0]["image"]
        assert a.shape == (2, 32, 32, 3) and a.any() and np.array_equal(a, b)


@needs_ext
def test_worker_renderer_failure_names_device_variables_and_fix():
    from vlarl_fast.envs import VectorEnv
    from vlarl_fast.envs.process_vector import WorkerError
    with pytest.raises(WorkerError) as e:
        VectorEnv([_reach()], backend="process", worker_env={"MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "9"})
    msg = str(e.value)
    assert "MUJOCO_EGL_DEVICE_ID" in msg.split("The renderer failed")[0]  # MuJoCo's own complaint, then ours
    assert "renders on EGL device 9, with MUJOCO_GL=egl" in msg and "MUJOCO_EGL_DEVICE_ID=9" in msg
    assert "--env.render-device cpu" in msg and "MUJOCO_GL=osmesa" in msg and "render_check" in msg


@needs_ext
def test_factory_render_errors_get_the_note_others_do_not():
    from vlarl_fast.envs import VectorEnv
    from vlarl_fast.envs.process_vector import WorkerError
    with pytest.raises(WorkerError, match=r"(?s)0x8cdd.*The renderer failed in this worker.*--env.render-device cpu"):
        VectorEnv([_raise_fatal], backend="process", render_devices="cpu")
    with pytest.raises(WorkerError) as e:
        VectorEnv([_raise_value], backend="process")
    assert "unknown shaping option" in str(e.value) and "The renderer failed" not in str(e.value)


def test_select_backend_tells_its_own_choice_from_the_users():
    code = ("from vlarl_fast.envs.render import select_backend, user_mujoco_gl\n"
            "select_backend()\nprint(user_mujoco_gl())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert r.stdout.strip() == "None", r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**env, "MUJOCO_GL": "egl"}, cwd="/")
    assert r.stdout.strip() == "egl", r.stderr[-2000:]


def test_render_device_option_is_checked_and_reaches_the_workers():
    from vlarl_fast.cli import _parse
    from vlarl_fast.config import EnvConfig, TrainConfig, resolve_env, vector_options
    cfg = _parse(TrainConfig, ["--env.render-device", "cuda:0,cuda:1"], "vlarl-fast train")
    assert cfg.env.render_device == "cuda:0,cuda:1"
    with pytest.raises(ValueError, match="use auto, cpu, cuda"):
        resolve_env(EnvConfig(render_device="gpu0"))
    with pytest.raises(ValueError, match="--env.backend process"):
        resolve_env(EnvConfig(render_device="cpu", backend="inprocess"))
    assert vector_options(EnvConfig(backend="process", render_device="cpu")) == {"backend": "process",
                                                                              "render_devices": "cpu"}
    assert vector_options(EnvConfig(backend="inprocess")) == {"backend": "inprocess"}


def test_render_check_runs_fresh_processes_and_summarises(capsys):
    from vlarl_fast.envs import render_check as RC
    rc = RC.main(["--sizes", "32", "--factor", "launcher=spawn,subprocess", "--factor", "egl_id=unset",
                  "--factor", "cuda_visible=unset", "--factor", "offsamples=0", "--factor", "triton=first",
                  "--jobs", "2", "--free-mib", ""])
    out = capsys.readouterr().out
    assert rc == 0 and "rendering devices:" in out and "summary: 2 passed, 0 failed" in out
    assert "PASS  size=32 launcher=spawn" in out and "PASS  size=32 launcher=subprocess" in out
    rows = [({"size": 64, "launcher": "spawn"}, {"ok": True}), ({"size": 224, "launcher": "spawn"}, {"ok": False}),
            ({"size": 224, "launcher": "subprocess"}, {"ok": True}),
            ({"size": 64, "launcher": "subprocess"}, {"ok": True})]
    assert RC.shared_by_failures(rows) == ({"size": 224, "launcher": "spawn"}, 0)
    assert RC.shared_by_failures(rows[:1]) == ({}, 0)


def test_render_check_memory_check_reports_how_many_workers_rendered(monkeypatch, capsys):
    # a stand-in GPU: 100 GiB free until the check holds all but the level; workers fail below 256 MiB
    import types

    from vlarl_fast.envs import render_check as RC
    held = []
    cuda = types.SimpleNamespace(mem_get_info=lambda: (100 * 2**30 - sum(held), 140 * 2**30), empty_cache=held.clear)
    fake = types.SimpleNamespace(cuda=cuda, uint8="uint8",
                                 empty=lambda n, dtype, device: held.append(n) or object())
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setattr(RC, "run_combo", lambda c, env, t: {"ok": True, "renderer": "GPU"} if
                        cuda.mem_get_info()[0] >= 256 * 2**20 else {"ok": False, "error": "FatalError: 0x8cdd"})
    out = RC.memory_check([512, 128], 224, 3, lambda c: {}, 1.0)
    assert [(mib, r["ok"]) for mib, r in out] == [(512, True), (128, False)]
    text = capsys.readouterr().out
    assert "PASS  size=224, 3 workers at once, 512 MiB" in text and "FAIL  size=224, 3 workers at once, 128 MiB" in text
    assert "0 rendered  FatalError: 0x8cdd" in text
