"""Which device each env worker renders on, and the environment variables that make MuJoCo use it.

EGL, CUDA and NVML number GPUs in different index spaces. EGL lists the devices of every vendor
(Mesa's software device too) in the order of its vendor libraries; NVML orders by PCI bus; CUDA
orders fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, and renumbers what CUDA_VISIBLE_DEVICES
names from 0. So ``MUJOCO_EGL_DEVICE_ID`` is never taken from a CUDA or NVML index: each GPU is
matched to its EGL device by PCI bus id (EGL_EXT_device_drm: the DRM node's sysfs link), by device
UUID (EGL_EXT_device_persistent_id), or by the CUDA ordinal the NVIDIA driver reports
(EGL_NV_device_cuda), and the worker's CUDA_VISIBLE_DEVICES names the same GPU by UUID, which no
ordering changes.

The matching and planning are pure functions over plain records (``EglDevice``, ``Gpu``), so
tests feed them made-up machines; ``query_egl_devices`` and ``query_gpus`` read the real ones.
Querying devices creates no GL context (a context must not exist before workers start), and
happens only when called, never at import.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

# set in a worker's environment: the device it is to render on, by an identity that holds in any
# process ("pci:<bus id>", "uuid:<hex>", "software"); render.select_backend looks its EGL index up again
# in the worker itself, in case the worker's own enumeration differs from the manager's
EGL_DEVICE_VAR = "VLARL_EGL_DEVICE"
RENDER_VARS = ("MUJOCO_GL", "PYOPENGL_PLATFORM", "MUJOCO_EGL_DEVICE_ID", "CUDA_VISIBLE_DEVICES",
               "__EGL_VENDOR_LIBRARY_FILENAMES", EGL_DEVICE_VAR)
CPU_FIX = "--env.render-device cpu (ProcessVectorEnv(render_devices='cpu')) or MUJOCO_GL=osmesa"
NO_EGL_FIX = ("install the NVIDIA driver's EGL library (libEGL_nvidia.so.0, in Debian's libnvidia-egl or the "
              "driver's libnvidia-gl package) and its libglvnd vendor file 10_nvidia.json, or point "
              "__EGL_VENDOR_LIBRARY_FILENAMES at that file")

_EGL_EXTENSIONS, _EGL_DRM_DEVICE_FILE, _EGL_DRM_RENDER_NODE_FILE = 0x3055, 0x3233, 0x3377
_EGL_CUDA_DEVICE_NV, _EGL_DEVICE_UUID = 0x323A, 0x335C
_MAX_EGL_DEVICES = 64


class RenderDeviceError(ValueError):
    pass


@dataclass(frozen=True)
class EglDevice:
    index: int                       # position in eglQueryDevicesEXT: what MUJOCO_EGL_DEVICE_ID takes
    extensions: tuple[str, ...] = ()
    drm_file: str | None = None      # /dev/dri/cardN or renderDN
    pci_bus_id: str | None = None    # of the DRM node, from sysfs (normalised)
    cuda_device: int | None = None   # EGL_CUDA_DEVICE_NV: the CUDA ordinal in the querying process
    uuid: str | None = None          # EGL_DEVICE_UUID_EXT as 32 hex digits

    @property
    def software(self) -> bool:
        return "EGL_MESA_device_software" in self.extensions


@dataclass(frozen=True)
class Gpu:
    index: int                       # NVML's index (PCI bus order)
    uuid: str                        # "GPU-..." as NVML and CUDA_VISIBLE_DEVICES write it
    pci_bus_id: str | None = None    # normalised
    name: str = ""
    cuda_index: int | None = None    # this process's CUDA ordinal; None: not known


def normalize_bus_id(bus_id: str | bytes | None) -> str | None:
    """'00000000:3B:00.0' (NVML) and '0000:3b:00.0' (sysfs) both become '0000:3b:00.0'."""
    if not bus_id:
        return None
    s = bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)
    try:
        domain, bus, rest = s.strip().lower().split(":")
        dev, fn = rest.split(".")
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{int(fn, 16)}"
    except ValueError:
        return None


def _uuid_hex(uuid: str | None) -> str | None:
    if not uuid:
        return None
    h = uuid.lower().removeprefix("gpu-").replace("-", "")
    return h if len(h) == 32 else None


# ---- this process's view of the GPUs --------------------------------------------------------------
def cuda_order(gpus: Sequence[Gpu], device_order: str | None) -> list[int] | None:
    """NVML indices in CUDA's enumeration order, None where it cannot be known from NVML: CUDA puts the
    fastest GPU first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, which is PCI order only when all are alike."""
    pci = [g.index for g in sorted(gpus, key=lambda g: (g.pci_bus_id or "", g.index))]
    if (device_order or "FASTEST_FIRST").upper() == "PCI_BUS_ID" or len({g.name for g in gpus}) <= 1:
        return pci
    return None


def narrow_by_cuda_visible(uuids: Sequence[str], cuda_visible: str | None,
                           order: Sequence[int] | None = None) -> list[int]:
    """Indices (into `uuids`) named by CUDA_VISIBLE_DEVICES, in its order (None: all, in `order`).
    Index entries count in `order` (CUDA's enumeration order; default: as listed). Stops at the first
    invalid entry, as CUDA does."""
    order = list(range(len(uuids))) if order is None else list(order)
    if cuda_visible is None:
        return order
    out: list[int] = []
    for tok in (t.strip() for t in cuda_visible.split(",")):
        if tok.isdigit() and int(tok) < len(order):
            idx = order[int(tok)]
        else:
            prefix = tok if tok.upper().startswith("GPU-") else "GPU-" + tok
            matches = [i for i, u in enumerate(uuids) if tok and u.lower().startswith(prefix.lower())]
            if len(matches) != 1:
                break
            idx = matches[0]
        if idx in out:
            break
        out.append(idx)
    return out


def visible(gpus: Sequence[Gpu], cuda_visible: str | None, device_order: str | None) -> list[Gpu]:
    """The GPUs CUDA shows this process, each with its CUDA ordinal; a clear error where index entries of
    CUDA_VISIBLE_DEVICES cannot be resolved."""
    gpus = sorted(gpus, key=lambda g: g.index)
    order = cuda_order(gpus, device_order)
    uses_indices = cuda_visible is not None and any(t.strip().isdigit() for t in cuda_visible.split(","))
    if order is None and uses_indices:
        raise RenderDeviceError(
            f"CUDA_VISIBLE_DEVICES={cuda_visible} names GPUs by index, but these GPUs differ "
            f"({', '.join(sorted({g.name for g in gpus}))}) and CUDA numbers them fastest first, an order NVML "
            "cannot tell: set CUDA_DEVICE_ORDER=PCI_BUS_ID, or name the GPUs by UUID (nvidia-smi -L)")
    pos = {g.index: i for i, g in enumerate(gpus)}
    chosen = narrow_by_cuda_visible([g.uuid for g in gpus], cuda_visible,
                                    None if order is None else [pos[i] for i in order])
    known = order is not None or cuda_visible is not None
    return [replace(gpus[p], cuda_index=k if known else None) for k, p in enumerate(chosen)]


# ---- matching GPUs to EGL devices -----------------------------------------------------------------
def match_egl(gpus: Sequence[Gpu], egl: Sequence[EglDevice]) -> dict[int, EglDevice]:
    """EGL device of each GPU (by NVML index), by PCI bus id, then device UUID, then the CUDA ordinal the
    driver reports (taken in the querying process's numbering, as the NVIDIA driver gives it). GPUs with no
    EGL device are left out; never a guess from positions."""
    out: dict[int, EglDevice] = {}
    taken: set[int] = set()

    def pair(key_gpu, key_egl) -> None:
        free = [d for d in egl if d.index not in taken and key_egl(d) is not None]
        for g in gpus:
            k = key_gpu(g)
            hits = [d for d in free if k is not None and key_egl(d) == k]
            if g.index not in out and len(hits) == 1 and hits[0].index not in taken:
                out[g.index] = hits[0]
                taken.add(hits[0].index)

    pair(lambda g: g.pci_bus_id, lambda d: d.pci_bus_id)
    pair(lambda g: _uuid_hex(g.uuid), lambda d: d.uuid)
    ordinals = [d.cuda_device for d in egl if d.cuda_device is not None]
    if len(ordinals) == len(set(ordinals)):  # duplicates: the driver's numbers mean nothing here
        pair(lambda g: g.cuda_index, lambda d: d.cuda_device)
    return out


def device_key(d: EglDevice) -> str | None:
    """An identity of the EGL device that any process can look up again (see EGL_DEVICE_VAR)."""
    if d.pci_bus_id:
        return "pci:" + d.pci_bus_id
    if d.uuid:
        return "uuid:" + d.uuid
    return "software" if d.software else None


def find_key(key: str, egl: Sequence[EglDevice]) -> EglDevice | None:
    hits = [d for d in egl if device_key(d) == key]
    return hits[0] if len(hits) == 1 else None


# ---- what each worker gets --------------------------------------------------------------------------
def parse_render_device(spec) -> str | list[int]:
    """'auto', 'cpu', 'cuda' (every visible GPU), or a list of CUDA ordinals from 'cuda:0,cuda:2', '0,2',
    a sequence of ints, or None/[] (= 'cpu')."""
    if spec is None or (not isinstance(spec, str) and len(spec) == 0):
        return "cpu"
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("auto", "cpu", "cuda"):
            return s
        toks = [t.strip().removeprefix("cuda:") for t in s.split(",")]
    else:
        toks = [str(t) for t in spec]
    if not all(t.isdigit() for t in toks):
        raise RenderDeviceError(f"unknown render device {spec!r}: use auto, cpu, cuda (every visible GPU), or "
                                "CUDA device indices such as cuda:0,cuda:1 (or 0,1)")
    return [int(t) for t in toks]


def gpu_vars(gpu: Gpu, dev: EglDevice) -> dict:
    key = device_key(dev)
    return {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "MUJOCO_EGL_DEVICE_ID": str(dev.index),
            "CUDA_VISIBLE_DEVICES": gpu.uuid, **({EGL_DEVICE_VAR: key} if key else {})}


def cpu_vars(egl: Sequence[EglDevice]) -> dict:
    """Mesa on the CPU: its software EGL device where EGL lists one (on an NVIDIA machine EGL's device 0 is
    usually the GPU), else OSMesa."""
    soft = [d for d in egl if d.software]
    if soft:
        return {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "MUJOCO_EGL_DEVICE_ID": str(soft[0].index),
                EGL_DEVICE_VAR: "software"}
    return {"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}


def _describe_gpu(g: Gpu) -> str:
    where = f"cuda:{g.cuda_index}" if g.cuda_index is not None else f"NVML GPU {g.index}"
    return f"{where} ({g.name or 'GPU'}, {g.uuid}, PCI {g.pci_bus_id or '?'})"


def plan_render_devices(spec, num_workers: int, gpus: Sequence[Gpu], egl: Sequence[EglDevice], *,
                        mujoco_gl: str | None = None, costs: Sequence[float] | None = None,
                        nvml_error: str | None = None, egl_error: str | None = None) -> tuple[list[dict], str | None]:
    """Render variables for each of `num_workers` workers, and a note for the caller to show (or None).

    `gpus` are the GPUs visible to this process (``visible``), `egl` its EGL devices, `mujoco_gl` the
    user's own MUJOCO_GL (None when unset). 'auto' renders on the GPUs that have an EGL device, spread by
    `costs`; with none it falls back to the CPU, saying why; a user's MUJOCO_GL other than egl is respected
    (nothing is set). 'cpu' renders with Mesa. Named GPUs must have an EGL device, else a
    RenderDeviceError names the fix."""
    from .balance import assign_devices
    choice = parse_render_device(spec)
    if num_workers < 1:
        raise RenderDeviceError(f"need at least one worker; got {num_workers}")
    costs = [1.0] * num_workers if costs is None else list(costs)
    if len(costs) != num_workers:
        raise ValueError(f"got {len(costs)} costs for {num_workers} workers")
    forced = mujoco_gl and mujoco_gl.lower() != "egl"
    if choice == "cpu":  # the user's own non-EGL backend (OSMesa) already renders on the CPU
        return [{} if forced else cpu_vars(egl) for _ in range(num_workers)], None
    if forced:
        if choice != "auto":
            raise RenderDeviceError(f"MUJOCO_GL={mujoco_gl} asks for rendering without EGL, but render device "
                                    f"{spec!r} needs EGL on a GPU: unset MUJOCO_GL, or use --env.render-device cpu")
        return [{} for _ in range(num_workers)], None
    if choice == "auto":
        if not gpus:  # no NVIDIA GPU (or no NVML): each worker picks EGL or OSMesa itself
            return [{} for _ in range(num_workers)], None
        chosen = list(gpus)
    else:
        if not gpus:
            why = (f"NVML is unavailable ({nvml_error})" if nvml_error
                   else "this process sees no NVIDIA GPU (check CUDA_VISIBLE_DEVICES)")
            raise RenderDeviceError(f"render device {spec!r} needs a GPU, but {why}; "
                                    "use --env.render-device cpu or auto")
        by_cuda = {g.cuda_index: g for g in gpus}
        if choice == "cuda":
            chosen = list(gpus)
        else:
            missing = [i for i in choice if i not in by_cuda]
            if missing:
                raise RenderDeviceError(f"cuda:{missing[0]} is not a GPU of this process, which sees "
                                        + ", ".join(_describe_gpu(g) for g in gpus))
            chosen = [by_cuda[i] for i in dict.fromkeys(choice)]
    matched = match_egl(chosen, egl)
    lost = [g for g in chosen if g.index not in matched]
    if lost:
        why = f"EGL cannot list devices ({egl_error})" if egl_error else "no EGL device matches it"
        msg = (f"{', '.join(_describe_gpu(g) for g in lost)}: {why}. To render on "
               f"{'it' if len(lost) == 1 else 'them'}, {NO_EGL_FIX}")
        if choice != "auto":
            raise RenderDeviceError(f"cannot render on {msg}; or render on the CPU with {CPU_FIX}")
        if len(lost) == len(chosen):
            return [cpu_vars(egl) for _ in range(num_workers)], f"rendering on the CPU (Mesa): {msg}"
    usable = [g for g in chosen if g.index in matched]
    envs = [gpu_vars(usable[d], matched[usable[d].index]) for d in assign_devices(costs, len(usable))]
    return envs, (f"not rendering on {msg}" if lost else None)


# ---- reading the real machine (impure, on demand) ----------------------------------------------------
def pci_bus_id_of_drm(drm_file: str | None, sysfs: str = "/sys/class/drm") -> str | None:
    """PCI bus id of a DRM node (/dev/dri/card1 -> /sys/class/drm/card1/device -> ../0000:3b:00.0)."""
    if not drm_file:
        return None
    link = os.path.join(sysfs, os.path.basename(drm_file), "device")
    return normalize_bus_id(os.path.basename(os.path.realpath(link))) if os.path.exists(link) else None


def query_egl_devices() -> list[EglDevice]:
    """This process's EGL devices (EGL_EXT_device_enumeration), read through ctypes: PyOpenGL would fix its
    platform at first import, before MUJOCO_GL is chosen. Raises OSError/RuntimeError when EGL cannot list
    devices."""
    lib = ctypes.CDLL("libEGL.so.1")
    lib.eglGetProcAddress.restype, lib.eglGetProcAddress.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    lib.eglGetError.restype = ctypes.c_int
    dev_t, attrib_t = ctypes.c_void_p, ctypes.c_ssize_t

    def fn(name: bytes, restype, *argtypes):
        p = lib.eglGetProcAddress(name)
        return ctypes.CFUNCTYPE(restype, *argtypes)(p) if p else None

    query_devices = fn(b"eglQueryDevicesEXT", ctypes.c_uint, ctypes.c_int, ctypes.POINTER(dev_t),
                       ctypes.POINTER(ctypes.c_int))
    query_string = fn(b"eglQueryDeviceStringEXT", ctypes.c_char_p, dev_t, ctypes.c_int)
    query_attrib = fn(b"eglQueryDeviceAttribEXT", ctypes.c_uint, dev_t, ctypes.c_int, ctypes.POINTER(attrib_t))
    query_binary = fn(b"eglQueryDeviceBinaryEXT", ctypes.c_uint, dev_t, ctypes.c_int, ctypes.c_ssize_t,
                      ctypes.c_void_p, ctypes.POINTER(ctypes.c_ssize_t))
    if query_devices is None or query_string is None:
        raise RuntimeError("libEGL lacks EGL_EXT_device_enumeration/EGL_EXT_device_query")
    devs, n = (dev_t * _MAX_EGL_DEVICES)(), ctypes.c_int()
    if not query_devices(_MAX_EGL_DEVICES, devs, ctypes.byref(n)):
        raise RuntimeError(f"eglQueryDevicesEXT failed (EGL error 0x{lib.eglGetError():x})")
    out = []
    for i in range(n.value):
        ext = tuple((query_string(devs[i], _EGL_EXTENSIONS) or b"").decode().split())
        drm = None
        if "EGL_EXT_device_drm" in ext:
            drm = query_string(devs[i], _EGL_DRM_DEVICE_FILE)
        if not drm and "EGL_EXT_device_drm_render_node" in ext:
            drm = query_string(devs[i], _EGL_DRM_RENDER_NODE_FILE)
        drm = drm.decode() if drm else None
        cuda = None
        if "EGL_NV_device_cuda" in ext and query_attrib is not None:
            v = attrib_t(-1)
            if query_attrib(devs[i], _EGL_CUDA_DEVICE_NV, ctypes.byref(v)) and v.value >= 0:
                cuda = int(v.value)
        uuid = None
        if "EGL_EXT_device_persistent_id" in ext and query_binary is not None:
            buf, size = (ctypes.c_ubyte * 16)(), ctypes.c_ssize_t(0)
            if query_binary(devs[i], _EGL_DEVICE_UUID, 16, buf, ctypes.byref(size)) and size.value == 16:
                uuid = bytes(buf).hex()
        out.append(EglDevice(i, ext, drm, pci_bus_id_of_drm(drm), cuda, uuid))
    lib.eglGetError()  # a refused query leaves an error behind; MuJoCo checks eglGetError after its own calls
    return out


def query_gpus() -> list[Gpu]:
    """Every NVIDIA GPU NVML lists (cuda_index unset: see ``visible``). Raises when NVML is unavailable."""
    import pynvml
    pynvml.nvmlInit()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            s = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
            out.append(Gpu(i, s(pynvml.nvmlDeviceGetUUID(h)), normalize_bus_id(pynvml.nvmlDeviceGetPciInfo(h).busId),
                           s(pynvml.nvmlDeviceGetName(h))))
        return out
    finally:
        pynvml.nvmlShutdown()


def machine(environ: Mapping[str, str] | None = None) -> dict:
    """This process's GPUs (visible under CUDA_VISIBLE_DEVICES), EGL devices, and why either is missing."""
    environ = os.environ if environ is None else environ
    out: dict = {"gpus": [], "egl": [], "nvml_error": None, "egl_error": None}
    try:
        out["gpus"] = visible(query_gpus(), environ.get("CUDA_VISIBLE_DEVICES"), environ.get("CUDA_DEVICE_ORDER"))
    except RenderDeviceError:
        raise
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound/DriverNotLoaded: no NVIDIA GPU here
        out["nvml_error"] = f"{type(e).__name__}: {e}"
    try:
        out["egl"] = query_egl_devices()
    except Exception as e:  # no libEGL, or no device extensions
        out["egl_error"] = f"{type(e).__name__}: {e}"
    return out


def worker_render_vars(render_device, num_workers: int, costs: Sequence[float] | None = None, *,
                       mujoco_gl: str | None = None) -> list[dict]:
    """Render variables for each worker on this machine (see plan_render_devices); warns on a fallback.
    ``mujoco_gl``: the user's own MUJOCO_GL (``render.user_mujoco_gl()``), None when unset."""
    if parse_render_device(render_device) == "cpu":
        m = {"gpus": [], "egl": [], "nvml_error": None, "egl_error": None}
        try:
            m["egl"] = query_egl_devices()
        except Exception:
            pass
    else:
        m = machine()
    envs, note = plan_render_devices(render_device, num_workers, m["gpus"], m["egl"], mujoco_gl=mujoco_gl,
                                     costs=costs, nvml_error=m["nvml_error"], egl_error=m["egl_error"])
    if note:
        import warnings
        warnings.warn(note + " (--env.render-device cpu renders on the CPU without this warning)", stacklevel=3)
    return envs


def resolve_in_worker(environ=os.environ) -> None:
    """Point MUJOCO_EGL_DEVICE_ID at the device EGL_DEVICE_VAR names, in this process's own enumeration
    (before its first GL context). The manager's index stays when the device cannot be found again."""
    key = environ.get(EGL_DEVICE_VAR)
    if not key or environ.get("MUJOCO_GL", "").lower() != "egl":
        return
    try:
        dev = find_key(key, query_egl_devices())
    except Exception:
        return
    if dev is not None:
        environ["MUJOCO_EGL_DEVICE_ID"] = str(dev.index)


# ---- describing a worker's renderer, for errors and `info` ------------------------------------------
def describe_device(environ: Mapping[str, str]) -> str:
    gl, key = environ.get("MUJOCO_GL"), environ.get(EGL_DEVICE_VAR, "")
    if gl and gl.lower() == "osmesa":
        return "the CPU (OSMesa)"
    if key == "software":
        return f"the CPU (Mesa's software EGL device {environ.get('MUJOCO_EGL_DEVICE_ID', '?')})"
    if key:
        return (f"GPU {key.split(':', 1)[1]} (EGL device {environ.get('MUJOCO_EGL_DEVICE_ID', '?')}, "
                f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if "MUJOCO_EGL_DEVICE_ID" in environ:
        return f"EGL device {environ['MUJOCO_EGL_DEVICE_ID']}"
    return "the first device its render backend finds (MUJOCO_EGL_DEVICE_ID unset)"


def is_render_error(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) came from the renderer: MuJoCo's GL errors, EGL/OSMesa/OpenGL."""
    # not after a letter: MUJOCO_EGL_DEVICE_ID counts, "negligible" does not
    words = re.compile(r"(?<![a-z])(egl|osmesa|opengl|framebuffer|mujoco_gl|gl context|render backend)", re.I)
    seen = 0
    while exc is not None and seen < 8:
        mod = type(exc).__module__ or ""
        if type(exc).__name__ in ("FatalError", "RenderBackendError", "GLError") or mod.startswith("OpenGL"):
            return True
        if words.search(str(exc)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


# below this much free GPU memory NVIDIA's EGL cannot allocate MuJoCo's offscreen buffers, and says so only as
# "Offscreen framebuffer is not complete, error 0x8cdd" (seen on an H200 with 0.25 GiB free; 3 GiB was enough
# for 16 workers at 224 px)
LOW_GPU_MEMORY = 1 << 30


def gpu_memory(uuid: str) -> tuple[int, int] | None:
    """(free, total) bytes of the GPU with this UUID, from NVML; None where NVML cannot tell."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            m = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByUUID(uuid))
            return int(m.free), int(m.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def release_cached_gpu_memory(render_vars: Sequence[Mapping[str, str]]) -> bool:
    """Hand PyTorch's cached GPU memory back to the driver before workers that render on a GPU start: a
    training process's caching allocator can hold nearly the whole GPU, and EGL then fails (LOW_GPU_MEMORY).
    Returns whether it did; a process that never touched CUDA has nothing to give back."""
    torch = sys.modules.get("torch")  # never imports torch (nor creates a CUDA context) itself
    if torch is None or not any(v.get("CUDA_VISIBLE_DEVICES") for v in render_vars):
        return False
    if not torch.cuda.is_initialized():
        return False
    torch.cuda.empty_cache()
    return True


def memory_note(free_total: tuple[int, int] | None) -> str:
    if free_total is None:
        return ""
    free, total = free_total
    note = f" The GPU has {free / 2**30:.2f} GiB of {total / 2**30:.0f} GiB free."
    if free < LOW_GPU_MEMORY:
        note += (" That is too little for EGL's framebuffers (on NVIDIA it fails as 'Offscreen framebuffer is not "
                 "complete'): start the envs before the model fills the GPU, release PyTorch's cached memory "
                 "(torch.cuda.empty_cache()) before they start, or render on the CPU.")
    return note


def render_failure_note(environ: Mapping[str, str], free_total: tuple[int, int] | None = None) -> str:
    """What a failed renderer was set up with, and the fix: appended to a worker's build error."""
    vars_ = " ".join(f"{k}={environ[k]}" for k in RENDER_VARS if k in environ) or "none of the rendering variables"
    return (f"The renderer failed in this worker, which renders on {describe_device(environ)}, with {vars_}."
            f"{memory_note(free_total)} To render on the CPU instead, use {CPU_FIX}; "
            "`python -m vlarl_fast.envs.render_check` tries which settings render on this machine.")


def report_lines() -> list[str]:
    """EGL devices and the GPU each renders for, as text (`vlarl-fast info`, render_check)."""
    try:
        m = machine()
    except RenderDeviceError as e:
        return [str(e)]
    pairs = match_egl(m["gpus"], m["egl"])
    matched = {pairs[g.index].index: g for g in m["gpus"] if g.index in pairs}
    lines = [f"EGL: cannot list devices ({m['egl_error']})"] if m["egl_error"] else []
    for d in m["egl"]:
        what = ("Mesa software (CPU)" if d.software else f"PCI {d.pci_bus_id}" if d.pci_bus_id
                else f"CUDA device {d.cuda_device}" if d.cuda_device is not None else "unidentified")
        g = matched.get(d.index)
        lines.append(f"EGL device {d.index}: {what}" + (f" -> {_describe_gpu(g)}" if g else ""))
    for g in m["gpus"]:
        if g not in matched.values():
            lines.append(f"{_describe_gpu(g)}: no EGL device (renders on the CPU under 'auto')")
    if m["nvml_error"]:
        lines.append(f"NVML: unavailable ({m['nvml_error']})")
    return lines
