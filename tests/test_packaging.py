"""Packaging: `vlarl-fast info`, kernels/ installed as vlarl_fast.kernels (never a top-level
`kernels`), the console script, and the wheel's contents."""
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from vlarl_fast.info import collect_info, format_info


def _editable() -> bool:
    try:
        raw = md.distribution("vlarl-fast").read_text("direct_url.json") or "{}"
        return bool(json.loads(raw).get("dir_info", {}).get("editable", False))
    except md.PackageNotFoundError:
        return False


def test_info_reports_components_and_never_raises():
    t0 = time.perf_counter()
    info = collect_info()
    elapsed = time.perf_counter() - t0
    text = format_info(info)
    for word in ("torch", "mujoco", "C++ extension", "Triton", "rendering", "CUDA", "NVML"):
        assert word in text
    assert info["extension"]["usable"] == ("C++ extension usable" in text)
    assert info["triton"].startswith(("compiled (CUDA)", "interpreter only", "not installed", "installed but"))
    if not info["accelerators"]["cuda"] and info["packages"]["triton"]:
        assert "interpreter only (TRITON_INTERPRET=1)" in text
    assert isinstance(info["problems"], list)
    json.dumps(info)  # plain data, e.g. for a bug report
    assert elapsed < 30  # well under 3 s on an idle machine; generous for a loaded CI box


def test_info_survives_missing_pieces(monkeypatch):
    import vlarl_fast.info as vi
    monkeypatch.setattr(vi, "_render", lambda: {"backend": None, "works": False, "error": "ImportError: gone"})
    monkeypatch.setattr(vi, "_version", lambda dist: None)
    info = vi.collect_info()
    text = vi.format_info(info)
    assert "rendering     NOT usable: ImportError: gone" in text
    assert "Triton        not installed" in text


def test_torchvision_mismatch_is_explained(monkeypatch):
    import vlarl_fast.info as vi
    monkeypatch.setattr(vi, "_version", lambda dist: {"torchvision": "0.24.0"}.get(dist))
    msg = vi._torchvision("2.13.0+cpu")
    assert msg and "pip uninstall -y torchvision" in msg


_TOP_LEVEL_KERNELS = """
import importlib.metadata as md, importlib.util, json, os
spec = importlib.util.find_spec("kernels")
print(json.dumps({"origin": spec.origin if spec else None,
                  "dists": md.packages_distributions().get("kernels", [])}))
"""


def top_level_kernels_problem(origin, dists, ours_dir, editable) -> str | None:
    """Why a top-level ``kernels`` module is ours (a packaging bug), or None. Another distribution's
    ``kernels`` (transformers >= 5.25 depends on Hugging Face's) is fine: ours lives in vlarl_fast.kernels."""
    if origin is None:
        return None
    here = os.path.realpath(os.path.dirname(origin))
    if here == os.path.realpath(ours_dir) and not editable:  # an editable install maps from the checkout
        return f"this package's kernels/ is importable as a top-level module from {here}"
    if "vlarl-fast" in dists:
        return "the vlarl-fast distribution installs a top-level `kernels` package"
    return None


def test_top_level_kernels_problem_rules():
    ours = os.path.join("site", "vlarl_fast", "kernels")
    assert top_level_kernels_problem(None, [], ours, False) is None
    assert top_level_kernels_problem(os.path.join("site", "kernels", "__init__.py"), ["kernels"], ours, False) is None
    assert "importable" in top_level_kernels_problem(os.path.join(ours, "__init__.py"), [], ours, False)
    assert "installs" in top_level_kernels_problem(os.path.join("x", "kernels", "__init__.py"), ["vlarl-fast"],
                                                   ours, False)


def test_kernels_install_inside_the_package():
    import vlarl_fast.kernels as k
    assert callable(k.gae) and callable(k.action_logprobs)
    assert os.path.basename(os.path.dirname(k.__file__)) == "kernels"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", _TOP_LEVEL_KERNELS], capture_output=True, text=True, cwd="/", env=env,
                       check=True)
    found = json.loads(r.stdout.strip().splitlines()[-1])
    problem = top_level_kernels_problem(found["origin"], found["dists"], os.path.dirname(k.__file__), _editable())
    assert problem is None, problem


def test_installed_files_map_kernels_into_the_package():
    if _editable():
        pytest.skip("editable install: files are mapped from the checkout")
    try:
        files = [str(f) for f in (md.files("vlarl-fast") or [])]
    except md.PackageNotFoundError:
        pytest.skip("vlarl-fast is not installed as a distribution")
    assert any(f.startswith("vlarl_fast/kernels/") and f.endswith("gae.py") for f in files)
    assert not any(f.startswith("kernels/") for f in files)
    assert any(f.startswith("vlarl_fast/_C") for f in files)  # the compiled extension is in the wheel


@pytest.mark.skipif(importlib.util.find_spec("vlarl_fast.cli") is None, reason="vlarl_fast.cli not written yet")
def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "vlarl_fast.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "info" in r.stdout
    exe = shutil.which("vlarl-fast", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("console script not on PATH")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout


@pytest.mark.skipif(importlib.util.find_spec("vlarl_fast.cli") is None, reason="vlarl_fast.cli not written yet")
def test_info_command_runs():
    exe = shutil.which("vlarl-fast", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [exe, "info"] if exe else [sys.executable, "-m", "vlarl_fast.cli", "info"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "C++ extension" in r.stdout and "Triton" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("scikit_build_core") is None, reason="scikit-build-core not installed")
def test_wheel_contents(tmp_path):
    """Build the wheel from the checkout: kernels/ lands in vlarl_fast/kernels, _C beside it."""
    import zipfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "pip", "wheel", root, "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), "-C", f"build-dir={tmp_path / 'build'}"], check=True, capture_output=True,
                   timeout=600)
    names = zipfile.ZipFile(next(tmp_path.glob("vlarl_fast-*.whl"))).namelist()
    assert "vlarl_fast/kernels/__init__.py" in names and "vlarl_fast/kernels/gae.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.startswith("vlarl_fast/_C") for n in names)


def test_version_warnings_name_the_fix():
    from vlarl_fast.versions import version_warnings
    floors = {"torch": "2.11", "numpy": "1.26.4", "transformers": "5.0.0"}
    msgs = version_warnings({"torch": "2.10.0+cu128", "numpy": "1.26.4", "transformers": "99.1.0",
                             "mujoco": None}, floors)
    assert len(msgs) == 2
    assert "torch 2.10.0+cu128 is older" in msgs[0] and "pip install 'torch>=2.11'" in msgs[0]
    assert "transformers 99.1.0 is newer" in msgs[1]
    assert version_warnings({"torch": "2.13.0+cpu", "numpy": "2.4.6"}, floors) == []


def test_declared_floors_match_pyproject():
    """`vlarl-fast info` reads the floors from the installed metadata; they are pyproject.toml's."""
    import re
    from pathlib import Path

    from vlarl_fast.versions import FALLBACK_FLOORS, NEWEST_TESTED, declared_floors
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("no pyproject.toml beside the tests")
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    want = {}
    for d in deps:
        m = re.match(r"([a-z0-9_-]+)\s*>=\s*([0-9.]+)", d)
        if m and m.group(1) in NEWEST_TESTED:
            want[m.group(1)] = m.group(2)
    assert set(want) == set(NEWEST_TESTED), "every core dependency declares a tested floor"
    assert FALLBACK_FLOORS == want
    if _editable():
        pytest.skip("editable install: its metadata is as old as the last `pip install -e .`")
    assert declared_floors() == want
