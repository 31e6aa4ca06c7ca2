"""Tests and benchmarks exercise the INSTALLED package: the compiled ``vlarl_fast._C`` and ``kernels/``
(installed as ``vlarl_fast.kernels``) exist only in an install, not in the bare source tree.

This file sits at the repository root so that it serves ``tests/`` and ``benchmarks/`` alike.
``pytest`` (the default "prepend" import mode, no ``__init__.py`` in tests/ or benchmarks/) puts only
the test folder on sys.path (and the root, for this file, which is dropped below), so ``import vlarl_fast`` finds the install. ``python -m pytest`` also puts the current
directory first; from the repository root the bare source tree would then shadow the install, so
drop that entry here. An editable install (``pip install -e . --no-build-isolation``) maps the
source tree itself through its import hook, so edits to Python files still count.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent


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


def pytest_collection_modifyitems(config, items):
    """The `gpu` tier (``pytest -m gpu``) needs CUDA: without it those tests are skipped, never failed,
    so the default run stays CPU-only."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (the gpu tier: pytest -m gpu on a GPU machine)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def usage_error(capsys):
    """``usage_error(pattern, argv)``: ``vlarl-fast argv`` must fail as a user's mistake does: exit code 2 and one
    line on stderr, starting with 'error:' and matching ``pattern``, with no traceback."""
    import re

    from vlarl_fast.cli import main

    def check(pattern: str, argv: list[str]) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ") and re.search(pattern, line), err
        return line
    return check
