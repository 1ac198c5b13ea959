"""Set-up shared by the Triton kernel tests: running them under Triton's interpreter on CPU.

The interpreter has to be switched on (``TRITON_INTERPRET=1``) before a kernel
is defined, which a pytest process that already imported the kernels cannot
undo. So each kernel test module defines its ``test_interp_*`` tests only when
the variable is set, and one ordinary test re-runs the module in a child pytest
process with the variable set (and no GPU visible): CPU CI checks the kernels
bit for bit against the torch reference without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
REPO_ROOT = Path(__file__).resolve().parents[3]
CHILD_TIMEOUT_S = 600


def run_interpreter_tests(test_file: str) -> None:
    """Run the ``test_interp_*`` tests of ``test_file`` in a child pytest under ``TRITON_INTERPRET=1``."""
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp_", test_file]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode == 5:
        pytest.fail(f"the interpreter run of {test_file} collected no tests")
    assert proc.returncode == 0, (f"interpreter run of {test_file} failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}")
