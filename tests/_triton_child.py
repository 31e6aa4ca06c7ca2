"""Run a test file's Triton tests in a child pytest with TRITON_INTERPRET=1.

triton.jit and triton.language's own helpers read TRITON_INTERPRET when triton is first imported,
so a CPU machine can only exercise the kernels in a fresh process that has it set from the start.
"""
import os
import subprocess
import sys

import pytest
import torch


def run_triton_tests_under_interpreter(test_file: str, keyword: str) -> None:
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton tests run directly here")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
                          "-k", f"{keyword} and not under_interpreter"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-3000:]
