import subprocess
import sys

from vlarl_fast.info import collect_info, format_info


def test_info_reports_components():
    info = collect_info()
    text = format_info(info)
    for word in ("torch", "mujoco", "C++ extension", "Triton", "rendering", "CUDA"):
        assert word in text
    assert info["render"]["works"]
    assert "interpreter" in info["triton"] or "compiled" in info["triton"] or "not installed" in info["triton"]


def test_kernels_install_inside_the_package():
    import vlarl_fast.kernels as k
    assert callable(k.gae) and callable(k.action_logprobs)
    if "site-packages" in k.__file__:  # a wheel install (an editable one maps the source tree)
        r = subprocess.run([sys.executable, "-c", "import kernels"], capture_output=True, cwd="/")
        assert r.returncode != 0, "kernels must not be importable as a top-level module"


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "vlarl_fast.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "info" in r.stdout
