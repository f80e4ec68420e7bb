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


def test_scalar_kernel_arguments_map_to_the_driver_ctypes():
    """Every scalar type a kernel signature uses converts to a ctypes value of the same width and kind."""
    import ctypes

    from numba import types

    from apnumba.kernels.launch import scalar_ctype

    expected = {types.int32: ctypes.c_int32, types.uint32: ctypes.c_uint32, types.int64: ctypes.c_int64,
                types.float32: ctypes.c_float, types.float64: ctypes.c_double}
    for ty, ctype in expected.items():
        assert scalar_ctype(ty) is ctype
        assert scalar_ctype(ty)(3).value == 3
