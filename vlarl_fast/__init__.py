"""vlarl-fast: online reinforcement learning of vision-language-action models in simulation."""
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _unshadow_kernels(path: list[str] = _sys.path) -> list[str]:
    """Drop the source checkout's root from ``path`` when it would make the checkout's ``kernels/`` folder the
    top-level ``kernels`` module: transformers imports Hugging Face's ``kernels`` package, and an editable install
    (scikit-build-core puts each package's parent folder on sys.path) or a script run from the root would hand it
    ours instead. vlarl_fast itself is found without that entry (the install, or the editable import hook), and
    its kernels are ``vlarl_fast.kernels``. Returns the entries removed."""
    removed = []
    for entry in list(path):
        try:
            root = _os.path.realpath(entry or _os.getcwd())
        except OSError:
            continue
        if (_os.path.isfile(_os.path.join(root, "kernels", "_errors.py"))
                and _os.path.isfile(_os.path.join(root, "vlarl_fast", "__init__.py"))):
            path.remove(entry)
            removed.append(entry)
    if removed and "kernels" in _sys.modules and "vlarl_fast" not in getattr(_sys.modules["kernels"], "__file__", ""):
        origin = _os.path.realpath(getattr(_sys.modules["kernels"], "__file__", "") or "")
        if any(origin.startswith(_os.path.realpath(r or _os.getcwd()) + _os.sep) for r in removed):
            del _sys.modules["kernels"]   # ours, imported by mistake before this ran
    return removed


_unshadow_kernels()
