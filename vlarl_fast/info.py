"""`vlarl-fast info`: what this installation can do, and the fix for what it cannot.

``collect_info()`` returns a plain dict (JSON-serialisable); ``format_info(info)`` renders it as
text; ``main()`` prints it. Every probe is wrapped: a broken component is reported, never raised.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import re
import sys

PACKAGES = ["torch", "transformers", "mujoco", "gymnasium", "numpy", "triton", "tyro", "peft", "pybind11",
            "torchvision", "flash-attn", "ray", "hf-libero", "libero", "robosuite"]
ALWAYS_SHOWN = ("torch", "transformers", "mujoco", "gymnasium", "numpy", "triton")
ENV_VARS = ["MUJOCO_GL", "PYOPENGL_PLATFORM", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "LP_NUM_THREADS",
            "VLARL_LIBERO_ASSETS", "VLARL_DISABLE_EXT"]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except Exception:
        return None


def _install() -> dict:
    """Where the package lives and whether it is an editable (developer) install."""
    here = os.path.dirname(os.path.abspath(__file__))
    editable = None
    try:
        raw = md.distribution("vlarl-fast").read_text("direct_url.json")
        if raw:
            editable = bool(json.loads(raw).get("dir_info", {}).get("editable", False))
    except Exception:
        pass
    return {"location": here, "editable": editable}


def _accelerators() -> dict:
    out: dict = {"cuda": False, "devices": [], "nvml": None, "torch_cuda": None}
    try:
        import torch
        out["torch_cuda"] = torch.version.cuda  # None for a CPU build
        out["cuda"] = bool(torch.cuda.is_available())
        if out["cuda"]:
            out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # torch missing or broken
        out["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
            names = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                n = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                names.append(n.decode() if isinstance(n, bytes) else n)
            out["nvml"] = f"driver {driver}, {len(names)} GPU(s)" + (f": {', '.join(names)}" if names else "")
        finally:
            pynvml.nvmlShutdown()
    except ImportError:
        out["nvml"] = "pynvml not installed (pip install nvidia-ml-py)"
    except Exception as e:  # NVMLError_LibraryNotFound on a machine without the NVIDIA driver
        out["nvml"] = f"no NVIDIA driver ({type(e).__name__})"
    return out


def _extension() -> dict:
    try:
        from ._ext import EXT_AVAILABLE, EXT_ERROR, build_info
        if EXT_AVAILABLE:
            return {"usable": True, "build": build_info(), "error": None}
        return {"usable": False, "build": None, "error": EXT_ERROR}
    except Exception as e:
        return {"usable": False, "build": None, "error": f"{type(e).__name__}: {e}"}


def _env_stepping(ext_usable: bool) -> str:
    if not ext_usable:
        return "in-process only (the worker-process manager needs the extension; --env.backend auto steps in-process)"
    try:
        from .envs.process_vector import default_num_workers
        cores = default_num_workers(1 << 16)
    except Exception as e:
        return f"worker processes unavailable ({type(e).__name__}: {e})"
    return f"worker processes (--env.backend auto): one per core, {cores} here, each serving several envs"


def _triton(cuda: bool) -> str:
    if _version("triton") is None:
        return "not installed (the kernels use their torch paths)"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"installed but fails to import ({type(e).__name__}: {e}); the kernels use their torch paths"
    if cuda:
        return "compiled (CUDA)"
    return "interpreter only (TRITON_INTERPRET=1); CPU tensors use the torch paths"


def _minor(version: str | None) -> int | None:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return int(m.group(2)) if m else None


def _torchvision(torch_version: str | None) -> str | None:
    """The known breakage: a PyPI torchvision (a CUDA build) beside a CPU torch fails at import with
    `operator torchvision::nms does not exist`, and then every transformers model class fails to import."""
    tv = _version("torchvision")
    if tv is None or torch_version is None:
        return None
    fix = ("Fix: `pip uninstall -y torchvision` (vlarl-fast and LIBERO's environments do not need it), or install "
           "a matching pair from one index (torchvision 0.N+15 goes with torch 2.N, both CPU or both CUDA).")
    t_minor, tv_minor = _minor(torch_version), _minor(tv)
    if t_minor is not None and tv_minor is not None and tv_minor != t_minor + 15:
        return f"torchvision {tv} does not match torch {torch_version}: transformers models may fail to import. {fix}"
    try:
        import torchvision  # noqa: F401  (torch is already imported: this costs little)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        what = ("operator torchvision::nms does not exist" if "torchvision::nms" in str(e)
                else f"{type(e).__name__}: {msg}")
        cpu_mismatch = "+cpu" in torch_version and "+cpu" not in tv
        return (f"torchvision {tv} fails to import next to torch {torch_version} ({what})"
                + (" — a CUDA torchvision beside a CPU torch" if cpu_mismatch else "")
                + f": every transformers model class will fail to import. {fix}")
    return None


def _render() -> dict:
    try:
        from .envs.render import backend_report
        rep = dict(backend_report())
        rep.setdefault("works", bool(rep.get("backend")))
        rep.setdefault("error", None)
        from .envs.render_devices import report_lines
        rep["devices"] = report_lines()  # the EGL device each GPU renders on (no GL context made)
        return rep
    except Exception as e:
        return {"backend": None, "works": False, "error": f"{type(e).__name__}: {e}"}


def _suites() -> dict:
    try:
        from .envs import list_tasks
        return {"tabletop": len(list_tasks("tabletop"))}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _libero() -> dict | None:
    """LIBERO's suites and where its assets come from; None where the extra is not installed."""
    if _version("libero") is None and _version("hf-libero") is None:
        return None
    out: dict = {"suites": {}, "assets": None, "error": None, "assets_error": None}
    try:
        from .envs.libero import SUITES, find_assets, list_tasks
        out["suites"] = {s: len(list_tasks(s)) for s in SUITES}
        try:
            out["assets"] = str(find_assets())
        except Exception as e:
            out["assets_error"] = str(e)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _libero_problems(packages: dict, libero: dict | None) -> list[str]:
    if libero is None:
        return []
    problems = []
    if libero["error"]:
        problems.append(f"LIBERO is installed but unusable: {libero['error']}")
    elif libero["assets_error"]:
        problems.append(f"LIBERO environments cannot be built: {libero['assets_error']}")
    mj = packages.get("mujoco")
    if mj and not re.match(r"3\.[89]\.", mj):
        problems.append(f"mujoco {mj} next to LIBERO: robosuite 1.4 works with MuJoCo 3.8 and 3.9 only. "
                        "Fix: `pip install 'mujoco>=3.8,<3.10'`")
    if packages.get("hf-libero") and packages.get("libero"):
        problems.append("both hf-libero and libero are installed (the same `libero` package): keep one, "
                        "`pip uninstall -y hf-libero` (it pins mujoco<3.9)")
    return problems


def _attention(cuda: bool) -> str:
    """The language model's attention kernel that --policy.attn-implementation auto picks here."""
    try:
        from .policy.precision import flash_attn_installed
        if flash_attn_installed():
            return ("flash_attention_2 for 16-bit checkpoints on CUDA" if cuda
                    else "sdpa (flash-attn is installed but needs a CUDA device)")
        return "sdpa" + (" (flash-attn not installed: the flash extra)" if cuda else "")
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"


def _distributed(cuda: bool) -> str:
    """What --dist.nproc and --dist.ray can use here."""
    try:
        import torch.distributed as dist
        if not dist.is_available():
            return "NOT usable: this torch build has no torch.distributed (runs stay in one process)"
        backends = [b for b, ok in (("gloo", dist.is_gloo_available()), ("nccl", cuda and dist.is_nccl_available()))
                    if ok]
    except Exception as e:
        return f"NOT usable: {e}"
    ray = _version("ray")
    return (f"torch.distributed ({', '.join(backends) or 'no backend'}; FSDP2 for --dist.shard full); Ray "
            + (f"{ray} (--dist.ray)" if ray else "not installed (optional, --dist.ray: the dist extra)"))


def _bc_precision(cuda: bool) -> str:
    """What --sft.bc-autocast auto picks for the behaviour-cloning steps on this machine's CPU (and GPU)."""
    try:
        from .policy.precision import cpu_native_bf16, resolve_bc_autocast
        native = cpu_native_bf16()
        cpu = (f"bfloat16 autocast on the CPU ({native})" if native
               else "float32 on the CPU (no native bfloat16: AMX or AVX512-BF16)")
        if cuda:
            gpu = "bfloat16" if resolve_bc_autocast("auto", "cuda") else "float32"
            return f"{cpu}; {gpu} on CUDA"
        return cpu
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"


def _version_warnings(packages: dict) -> list[str]:
    try:
        from .versions import version_warnings
        return version_warnings(packages)
    except Exception as e:
        return [f"version check failed: {type(e).__name__}: {e}"]


def collect_info() -> dict:
    """Everything `vlarl-fast info` reports, as a JSON-serialisable dict. Never raises."""
    try:
        from . import __version__
    except Exception:
        __version__ = _version("vlarl-fast") or "unknown"
    env = {k: os.environ[k] for k in ENV_VARS if k in os.environ}  # before the render probe sets MUJOCO_GL
    packages = {p: _version(p) for p in PACKAGES}
    acc = _accelerators()
    info: dict = {
        "vlarl_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "install": _install(),
        "packages": packages,
        "accelerators": acc,
        "extension": _extension(),
        "triton": _triton(acc["cuda"]),
        "attention": _attention(acc["cuda"]),
        "bc_precision": _bc_precision(acc["cuda"]),
        "distributed": _distributed(acc["cuda"]),
        "render": _render(),
        "suites": _suites(),
        "libero": _libero(),
        "env": env,
    }
    problems = []
    tv = _torchvision(packages["torch"])
    if tv:
        problems.append(tv)
    if "torch_error" in acc:
        problems.append(f"torch fails to import: {acc['torch_error']}")
    if not info["extension"]["usable"]:
        problems.append("the compiled extension is missing: the vectorised env manager falls back to pure Python")
    if not info["render"]["works"]:
        problems.append("no headless render backend: environments cannot render observations")
    problems += _libero_problems(packages, info["libero"])
    info["problems"] = problems
    info["warnings"] = _version_warnings(packages)
    return info


def _fmt_build(build: dict | None) -> str:
    if not build:
        return ""
    return ", ".join(str(build[k]) for k in ("compiler", "cxx_standard", "build_type") if k in build) + (
        f", waits: {build['wait']}" if "wait" in build else "")


def format_info(info: dict) -> str:
    """Plain-text report of `collect_info()`."""
    acc = info["accelerators"]
    inst = info.get("install", {})
    mode = {True: "editable install", False: "installed", None: "source tree / unknown install"}[inst.get("editable")]
    lines = [f"vlarl-fast {info['vlarl_fast']}  (Python {info['python']}, {info['platform']})",
             f"  {mode}: {inst.get('location', '?')}", "", "packages:"]
    for name, v in info["packages"].items():
        if v is not None or name in ALWAYS_SHOWN:
            lines.append(f"  {name:13s} {v or 'not installed'}")
    cuda = ("yes: " + ", ".join(acc["devices"])) if acc["cuda"] else (
        "no (CPU only" + (f"; torch built for CUDA {acc['torch_cuda']}" if acc.get("torch_cuda") else ", CPU build of torch")
        + ")")
    lines += ["", "accelerators:", f"  CUDA          {cuda}", f"  NVML          {acc['nvml']}"]
    ext = info["extension"]
    render = info["render"]
    suites = info["suites"]
    lines += ["", "components:",
              f"  C++ extension {'usable (' + _fmt_build(ext['build']) + ')' if ext['usable'] else 'NOT usable: ' + str(ext['error'])}",
              f"  env stepping  {_env_stepping(ext['usable'])}",
              f"  Triton        {info['triton']}",
              f"  attention     {info['attention']}",
              f"  BC precision  {info['bc_precision']}",
              f"  distributed   {info['distributed']}",
              f"  rendering     {str(render.get('backend')) + ' (headless MuJoCo)' if render['works'] else 'NOT usable: ' + str(render['error'])}",
              *(f"                {d}" for d in render.get("devices", [])),
              "  task suites   " + ("error: " + suites["error"] if "error" in suites
                                    else ", ".join(f"{k} ({v} tasks)" for k, v in suites.items()))]
    lib = info.get("libero")
    if lib is None:
        lines.append("  LIBERO        not installed (optional: the libero extra)")
    elif lib["error"]:
        lines.append(f"  LIBERO        NOT usable: {lib['error']}")
    else:
        lines.append("  LIBERO        " + ", ".join(f"{k} ({v} tasks)" for k, v in lib["suites"].items()))
        lines.append(f"  LIBERO assets {lib['assets'] or 'NOT found (see problems)'}")
    if info.get("env"):
        lines += ["", "environment:"] + [f"  {k}={v}" for k, v in info["env"].items()]
    if info.get("warnings"):
        lines += ["", "warnings:"] + [f"  - {w}" for w in info["warnings"]]
    if info["problems"]:
        lines += ["", "problems:"] + [f"  - {p}" for p in info["problems"]]
    return "\n".join(lines)


def main() -> int:
    print(format_info(collect_info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
