"""Shared test helpers.

Three layers: CPU (reference vs integers), no-GPU (PTX/SASS, the simulator in its
own process), GPU (skipped cleanly without one).
"""

import numpy as np
import pytest

from apnumba.device import gpu_available
from apnumba.kernels.ptx import SIMULATOR

requires_gpu = pytest.mark.skipif(SIMULATOR or not gpu_available(), reason="needs a CUDA GPU of compute capability >= 8.0")
requires_simulator = pytest.mark.skipif(
    not SIMULATOR, reason="simulator tests run in their own process (tests/test_simulator.py starts it)"
)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: reproducible, different per test."""
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))
