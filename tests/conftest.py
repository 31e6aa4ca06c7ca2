"""The tests exercise the INSTALLED package: the compiled ``vlarl_fast._C`` and ``kernels/``
(installed as ``vlarl_fast.kernels``) exist only in an install, not in the bare source tree.

``pytest`` (the default "prepend" import mode, tests/ without ``__init__.py``) puts only tests/ on
sys.path, so ``import vlarl_fast`` finds the install. ``python -m pytest`` also puts the current
directory first; from the repository root the bare source tree would then shadow the install, so
drop that entry here. An editable install (``pip install -e . --no-build-isolation``) maps the
source tree itself through its import hook, so edits to Python files still count.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == _ROOT
    except OSError:
        return False


if "vlarl_fast" not in sys.modules:
    sys.path[:] = [p for p in sys.path if not _is_root(p)]
    if importlib.util.find_spec("vlarl_fast") is None:
        pytest.exit("vlarl-fast is not installed: run `pip install \".[test]\"` (or, for development, "
                    "`pip install -e . --no-build-isolation`) before pytest", returncode=4)
