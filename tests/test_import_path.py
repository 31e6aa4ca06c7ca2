"""A checkout's root on sys.path (an editable install puts it there) must not shadow Hugging Face's `kernels`."""
import os
import subprocess
import sys
from pathlib import Path

import vlarl_fast

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_root_is_dropped_from_the_path_it_would_shadow_kernels_on():
    path = [str(ROOT), "/elsewhere"]
    removed = vlarl_fast._unshadow_kernels(path)
    assert removed == [str(ROOT)] and path == ["/elsewhere"]


def test_importing_vlarl_fast_with_the_root_first_leaves_transformers_its_kernels():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import vlarl_fast, importlib.util; "
            "spec = importlib.util.find_spec('kernels'); "
            "print('ours' if spec and spec.origin and spec.origin.startswith(sys.argv[1]) else 'not ours')")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd="/",
                         env=os.environ | {"PYTHONSAFEPATH": "1"}, check=True).stdout.strip()
    assert out == "not ours"
