"""The compiled core ``vlarl_fast._C``, if this install has it.

A pure-Python install (no compiler at install time, an unsupported platform, or a source tree
that was never built) still imports the package: ``EXT_AVAILABLE`` is False, ``EXT_ERROR`` says
why, ``vlarl-fast info`` reports it, and code that needs the extension calls ``require_ext()``
for an error that names the fix. ``VLARL_DISABLE_EXT=1`` forces the pure-Python paths.
"""
from __future__ import annotations

import os

_C = None
EXT_AVAILABLE = False
EXT_ERROR: str | None = None

if os.environ.get("VLARL_DISABLE_EXT", "") not in ("", "0"):
    EXT_ERROR = "disabled by VLARL_DISABLE_EXT=1"
else:
    try:
        from . import _C  # noqa: F811
        EXT_AVAILABLE = True
    except Exception as e:  # ImportError, or an ABI/symbol error from a stale build
        _C = None
        EXT_ERROR = (f"{type(e).__name__}: {e}. Build it with `pip install .` (needs a C++17 compiler, e.g. "
                     "`apt-get install g++`), or `pip install -e . --no-build-isolation` in a checkout")


def require_ext():
    """The compiled module, or a RuntimeError that says why it is missing and how to build it."""
    if not EXT_AVAILABLE:
        raise RuntimeError(f"the compiled extension vlarl_fast._C is not available: {EXT_ERROR}")
    return _C


def build_info() -> dict | None:
    """Compiler, C++ standard, build type and wait mechanism of the extension; None without it."""
    return dict(_C.build_info()) if EXT_AVAILABLE else None
