"""CPU: the errors a user meets before anything is launched."""

import numpy as np
import pytest

import apnumba.device as device
from apnumba.kernels.ptx import SIMULATOR

pytestmark = pytest.mark.skipif(SIMULATOR, reason="the simulator always offers a device")


@pytest.fixture
def fresh_cc():
    device.compute_capability.cache_clear()
    yield
    device.compute_capability.cache_clear()


class FakeDevice:
    def __init__(self, cc, name=b"Fake GPU"):
        self.compute_capability = cc
        self.name = name


def test_no_gpu_says_what_to_do_instead(monkeypatch, fresh_cc):
    monkeypatch.setattr(device.cuda, "is_available", lambda: False)
    with pytest.raises(device.NoGPUError, match="NUMBA_ENABLE_CUDASIM=1.*apnumba.reference.apmm"):
        device.require_gpu()
    assert not device.gpu_available()


def test_old_gpu_is_refused_with_its_compute_capability(monkeypatch, fresh_cc):
    monkeypatch.setattr(device.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device.cuda, "get_current_device", lambda: FakeDevice((7, 5), b"Tesla T4"))
    with pytest.raises(device.UnsupportedGPUError, match=r"Tesla T4 has compute capability 7\.5.*8\.0 or newer"):
        device.require_gpu()


def test_ampere_and_hopper_are_accepted(monkeypatch, fresh_cc):
    monkeypatch.setattr(device.cuda, "is_available", lambda: True)
    for cc in [(8, 0), (8, 6), (9, 0)]:
        device.compute_capability.cache_clear()
        monkeypatch.setattr(device.cuda, "get_current_device", lambda cc=cc: FakeDevice(cc))
        assert device.compute_capability() == cc


def test_gpu_entry_points_refuse_early_without_a_gpu(monkeypatch, fresh_cc):
    from apnumba import PackedTensor, apmm, matmul

    monkeypatch.setattr(device.cuda, "is_available", lambda: False)
    with pytest.raises(device.NoGPUError):
        PackedTensor.from_codes(np.zeros((2, 3), int), "u1")
    with pytest.raises(device.NoGPUError):
        PackedTensor.from_float(np.zeros((2, 3), np.float32), "u1")
    with pytest.raises(device.NoGPUError):
        matmul(np.zeros((2, 3), int), np.zeros((2, 3), int), "u1", "u1")
    with pytest.raises(device.NoGPUError):
        apmm(None, None)
