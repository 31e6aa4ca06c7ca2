import subprocess
import sys

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
