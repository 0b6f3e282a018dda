"""The test session's own set-up: a run that would skip every kernel test must not pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine TRITON_INTERPRET=0 runs the compiled kernels")
@pytest.mark.parametrize("value", ["0", ""])
def test_interpreter_switched_off_without_cuda_is_a_loud_error(value):
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": value}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                          str(tests / "test_setup.py")], cwd=tests.parent, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "TRITON_INTERPRET" in run.stdout + run.stderr and "without CUDA" in run.stdout + run.stderr
