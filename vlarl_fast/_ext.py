"""The compiled core, if this install has it (a source tree without a build does not)."""
from __future__ import annotations

try:
    from . import _C  # noqa: F401
    EXT_AVAILABLE = True
    EXT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on how the package was installed
    _C = None
    EXT_AVAILABLE = False
    EXT_ERROR = f"{e} (reinstall with `pip install .` to build it)"


def require_ext():
    if not EXT_AVAILABLE:
        raise RuntimeError(f"the compiled extension vlarl_fast._C is not available: {EXT_ERROR}")
    return _C
