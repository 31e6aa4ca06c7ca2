"""`vlarl-fast info`: what this installation can do, and the fix for what it cannot."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import subprocess
import sys

PACKAGES = ["torch", "transformers", "mujoco", "gymnasium", "numpy", "triton", "tyro", "pybind11", "flash-attn",
            "ray", "libero", "hf-libero"]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _accelerators() -> dict:
    out: dict = {"cuda": False, "devices": [], "nvml": None}
    try:
        import torch
        out["cuda"] = torch.cuda.is_available()
        if out["cuda"]:
            out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # torch missing or broken
        out["torch_error"] = str(e)
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            out["nvml"] = f"driver {pynvml.nvmlSystemGetDriverVersion()}, {pynvml.nvmlDeviceGetCount()} GPU(s)"
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # NVMLError_LibraryNotFound on machines without a driver
        out["nvml"] = f"no NVIDIA driver ({type(e).__name__})"
    return out


def _triton(cuda: bool) -> str:
    if _version("triton") is None:
        return "not installed (kernels use their torch paths)"
    try:
        importlib.import_module("triton")
    except Exception as e:
        return f"installed but fails to import: {e}"
    return "compiled (CUDA)" if cuda else "interpreter only (TRITON_INTERPRET=1); CPU tensors use the torch paths"


def _torchvision() -> str | None:
    """A PyPI torchvision built for CUDA beside a CPU torch breaks every transformers model import."""
    if _version("torchvision") is None:
        return None
    r = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=60)
    if r.returncode == 0:
        return None
    if "torchvision::nms" in r.stderr:
        return ("torchvision does not match torch (operator torchvision::nms does not exist): transformers models "
                "will fail to import. Fix: `pip uninstall -y torchvision` (LIBERO does not need it) or install a "
                "matching torch/torchvision pair.")
    return "torchvision fails to import: " + r.stderr.strip().splitlines()[-1][:200]


def collect_info() -> dict:
    from . import __version__
    from ._ext import EXT_AVAILABLE, EXT_ERROR
    info: dict = {"vlarl_fast": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
                  "packages": {p: _version(p) for p in PACKAGES}}
    acc = _accelerators()
    info["accelerators"] = acc
    if EXT_AVAILABLE:
        from ._ext import _C
        info["extension"] = {"usable": True, "build": _C.build_info()}
    else:
        info["extension"] = {"usable": False, "error": EXT_ERROR}
    info["triton"] = _triton(acc["cuda"])
    try:
        from .envs.render import backend_report
        info["render"] = backend_report()
    except Exception as e:
        info["render"] = {"backend": None, "works": False, "error": f"{type(e).__name__}: {e}"}
    try:
        from .envs import list_tasks
        info["suites"] = {"tabletop": len(list_tasks("tabletop"))}
    except Exception as e:
        info["suites"] = {"error": str(e)}
    info["problems"] = [p for p in [_torchvision()] if p]
    return info


def format_info(info: dict) -> str:
    acc = info["accelerators"]
    lines = [f"vlarl-fast {info['vlarl_fast']}  (Python {info['python']}, {info['platform']})", "", "packages:"]
    for name, v in info["packages"].items():
        if v is not None or name in ("torch", "transformers", "mujoco", "gymnasium", "triton"):
            lines.append(f"  {name:13s} {v or 'not installed'}")
    lines += ["", "accelerators:",
              f"  CUDA          {'yes: ' + ', '.join(acc['devices']) if acc['cuda'] else 'no (CPU only)'}",
              f"  NVML          {acc['nvml']}"]
    ext = info["extension"]
    render = info["render"]
    lines += ["", "components:",
              f"  C++ extension {'usable (' + ext['build'] + ')' if ext['usable'] else 'NOT usable: ' + ext['error']}",
              f"  Triton        {info['triton']}",
              f"  rendering     {render['backend'] + ' (headless MuJoCo)' if render['works'] else 'NOT usable: ' + str(render['error'])}",
              f"  task suites   {', '.join(f'{k} ({v} tasks)' for k, v in info['suites'].items())}"]
    if info["problems"]:
        lines += ["", "problems:"] + [f"  - {p}" for p in info["problems"]]
    return "\n".join(lines)
