"""Headless render-backend selection for MuJoCo (EGL or OSMesa through Mesa on a CPU).

MuJoCo reads ``MUJOCO_GL`` when it first creates a context, so the choice is made before the
first renderer exists. Probing creates a throw-away context in the calling process only when
asked (first env creation, or ``vlarl-fast info``), never at import: a GL context must not be
inherited by forked workers (a child inheriting an EGL context through fork hangs silently).
"""
from __future__ import annotations

import os

DEBIAN_PACKAGES = {"egl": "libegl1 libgl1-mesa-dri", "osmesa": "libosmesa6"}
_selected: str | None = None
_chosen_here = False  # MUJOCO_GL was set by select_backend, not by the user


class RenderBackendError(RuntimeError):
    pass


def missing_backend_message(tried: dict[str, str]) -> str:
    details = "; ".join(f"{k}: {v}" for k, v in tried.items()) or "none tried"
    return ("no headless render backend works (" + details + "). Install Mesa: "
            f"`apt-get install {DEBIAN_PACKAGES['egl']}` (EGL) or `apt-get install {DEBIAN_PACKAGES['osmesa']}` "
            "(OSMesa), or force one with MUJOCO_GL=egl|osmesa (on a GPU machine MUJOCO_GL=egl uses the NVIDIA driver).")


def _probe(backend: str):
    """Create and free a 1x1 context with ``backend``; returns its GLContext class."""
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    elif backend == "glfw":
        from mujoco.glfw import GLContext
    else:
        raise ValueError(f"unknown MUJOCO_GL value {backend!r}; use egl, osmesa or glfw")
    ctx = GLContext(1, 1)
    try:
        ctx.make_current()
    finally:
        ctx.free()
    return GLContext


def _install(context_cls) -> None:
    # mujoco picks its context class from MUJOCO_GL when it is first imported; if it was
    # imported before MUJOCO_GL was set, point its renderer at the backend chosen here.
    from mujoco.rendering.classic import gl_context
    gl_context.GLContext = context_cls


def _load_triton_first() -> None:
    """Mesa's software renderer and Triton each carry their own LLVM: loading libtriton after a Mesa
    GL context exists crashes the process (seen with triton 3.9, Mesa llvmpipe), and torch and
    transformers import triton lazily, often after the first env has rendered. Loaded first, both
    work, so it is loaded here, before any GL context."""
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or broken: nothing to order
        pass


def user_mujoco_gl() -> str | None:
    """MUJOCO_GL as the user set it (None when unset, or set by select_backend's own choice)."""
    return None if _chosen_here else os.environ.get("MUJOCO_GL")


def select_backend() -> str:
    """Respect MUJOCO_GL if set; otherwise pick EGL, then OSMesa. Cached per process."""
    global _selected, _chosen_here
    if _selected is not None:
        return _selected
    _load_triton_first()
    from .render_devices import resolve_in_worker
    resolve_in_worker()  # a worker told which device to use: its EGL index, in this process's enumeration
    forced = os.environ.get("MUJOCO_GL")
    candidates = [forced] if forced else ["egl", "osmesa"]
    tried: dict[str, str] = {}
    for backend in candidates:
        if not forced:
            os.environ["MUJOCO_GL"] = backend
            os.environ.setdefault("PYOPENGL_PLATFORM", backend)
        try:
            context_cls = _probe(backend)
        except Exception as e:  # ImportError, EGL/OSMesa errors
            tried[backend] = f"{type(e).__name__}: {e}".strip()[:200]
            if not forced:
                os.environ.pop("MUJOCO_GL", None)
                if os.environ.get("PYOPENGL_PLATFORM") == backend:
                    os.environ.pop("PYOPENGL_PLATFORM", None)
            continue
        _install(context_cls)
        _selected, _chosen_here = backend, not forced
        return backend
    raise RenderBackendError(missing_backend_message(tried))


def backend_report() -> dict:
    """For `vlarl-fast info`: which backend renders here, or why none does."""
    try:
        backend = select_backend()
        return {"backend": backend, "works": True, "error": None}
    except RenderBackendError as e:
        return {"backend": None, "works": False, "error": str(e)}
