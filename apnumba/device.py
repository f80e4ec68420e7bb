"""Which GPU we run on, and the checks made before anything is launched."""

import functools

import numpy as np
from numba import cuda

from .kernels.ptx import SIMULATOR
from .precision import Precision

MIN_CC = (8, 0)
INT32_MAX = 2**31 - 1


class NoGPUError(RuntimeError):
    """No CUDA GPU is visible."""


class UnsupportedGPUError(RuntimeError):
    """The GPU lacks the b1 tensor-core instructions apnumba uses (compute capability < 8.0)."""


class AccumulatorOverflowError(ValueError):
    """An int32 accumulator could overflow for this K and these precisions."""


NO_GPU_HELP = (
    "apnumba needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Hopper) and found none. "
    "Without one you can: run the kernels in numba's CUDA simulator (set NUMBA_ENABLE_CUDASIM=1 before "
    "importing apnumba; slow, for a few warps only), or compute with the numpy reference "
    "(apnumba.reference.apmm), which gives the same integers."
)


@functools.lru_cache(maxsize=None)
def compute_capability():
    """(major, minor) of the current device; raises NoGPUError / UnsupportedGPUError."""
    if SIMULATOR:
        return (9, 0)
    try:
        available = cuda.is_available()
    except Exception:  # a broken driver install reads the same as none to the user
        available = False
    if not available:
        raise NoGPUError(NO_GPU_HELP)
    cc = tuple(cuda.get_current_device().compute_capability)
    if cc < MIN_CC:
        name = cuda.get_current_device().name
        name = name.decode() if isinstance(name, bytes) else name
        raise UnsupportedGPUError(
            f"{name} has compute capability {cc[0]}.{cc[1]}; apnumba's b1 mma.sync m16n8k256 needs 8.0 or newer"
        )
    return cc


def require_gpu():
    """Raise a clear error unless a usable GPU (or the simulator) is present."""
    compute_capability()


def gpu_available():
    """True when kernels can run here (a GPU of cc >= 8.0, or the simulator)."""
    try:
        require_gpu()
        return True
    except (NoGPUError, UnsupportedGPUError):
        return False


def device_name():
    if SIMULATOR:
        return "CUDA simulator"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def _max_abs(precision, zero_point):
    precision = Precision.parse(precision)
    return max(abs(precision.lo - zero_point), abs(precision.hi - zero_point))


def product_bound(K, pw, px, zw=0, zx=0):
    """Largest |sum_k (w - zw)(x - zx)| over K terms of the two precisions."""
    return int(K) * _max_abs(pw, zw) * _max_abs(px, zx)


def check_accumulator(K, pw, px, zw=0, zx=0):
    """Refuse a product whose int32 result could overflow (checked before any launch)."""
    bound = product_bound(K, pw, px, zw, zx)
    if bound > INT32_MAX:
        pw, px = Precision.parse(pw), Precision.parse(px)
        kmax = INT32_MAX // (_max_abs(pw, zw) * _max_abs(px, zx))
        raise AccumulatorOverflowError(
            f"K={K} with weights {pw} and activations {px}: |sum| can reach {bound} > 2^31-1, so the int32 "
            f"accumulator could overflow; K must be at most {kmax} for these precisions (split K, or use fewer bits)"
        )


def is_device_array(a):
    return cuda.is_cuda_array(a) if not SIMULATOR else hasattr(a, "copy_to_host")


def as_device_array(a, name, dtypes=None, ndim=None):
    """A numba device view of ``a`` (host arrays are copied over), with a clear error on bad input."""
    if not is_device_array(a):
        a = np.ascontiguousarray(a)
        check_array(a, name, dtypes, ndim)
        return cuda.to_device(a)
    d = cuda.as_cuda_array(a) if not SIMULATOR else a
    check_array(d, name, dtypes, ndim)
    return d


def zero_fill(array, stream):
    """Asynchronous memset of a device array to zero (a memset node when captured in a graph)."""
    if SIMULATOR:
        array.copy_to_device(np.zeros(array.shape, dtype=array.dtype))
        return
    from numba.cuda.cudadrv.driver import device_memset

    device_memset(array, 0, array.size * array.dtype.itemsize, stream=stream)


def check_array(a, name, dtypes=None, ndim=None):
    if dtypes is not None and np.dtype(a.dtype) not in [np.dtype(t) for t in dtypes]:
        raise TypeError(f"{name}: expected dtype {' or '.join(np.dtype(t).name for t in dtypes)}, got {np.dtype(a.dtype).name}")
    if ndim is not None and len(a.shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(a.shape)}")
