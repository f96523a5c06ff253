"""Run a test script (e.g. a 2-process DDP run, which relaunches itself) in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_script(script: Path, cwd: Path, *args: str, timeout: int = 300) -> str:
    """Run ``python script args...`` in ``cwd`` with warnings silenced and one OpenMP thread; fail with its stderr.
    Returns what it printed."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
