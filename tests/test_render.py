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
