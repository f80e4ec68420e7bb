"""Run tests/sim in numba's CUDA simulator, in a process of its own (the simulator is chosen at import)."""

import os
from pathlib import Path
import subprocess
import sys

import pytest

from apnumba.kernels.ptx import SIMULATOR


@pytest.mark.skipif(SIMULATOR, reason="already inside the simulator")
def test_simulator_suite():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests" / "sim")],
        cwd=root, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
