"""Compile once, launch cheaply: what the kernels' host code shares.

numba's ``kernel[grid, block](*args)`` types and converts every argument on every
call (tens of microseconds for a dozen arrays).  :class:`CompiledKernel` compiles
for one signature up front; :meth:`CompiledKernel.bind` converts the arguments
once and returns a :class:`BoundLaunch` whose call is a single driver launch.
Array parameters are declared 1-D C-contiguous (``T[::1]``); any C-contiguous
device array is passed as its flat view without building a numba view object.
"""

import numpy as np
from numba import cuda, types

from .ptx import SIMULATOR

STATIC_SHARED_LIMIT = 48 * 1024


def _flat(array):
    if SIMULATOR:
        return array.reshape(array.size) if len(array.shape) != 1 else array
    return array


class CompiledKernel:
    """``kernel`` compiled for ``signature`` (a tuple of numba types), allowed ``dynamic_shared`` bytes."""

    def __init__(self, kernel, signature, dynamic_shared=0):
        self.kernel = kernel
        self.signature = tuple(signature)
        self.dynamic_shared = int(dynamic_shared)
        self._compiled = None
        if not SIMULATOR:
            self._compiled = kernel.compile(self.signature)
            if self.dynamic_shared > STATIC_SHARED_LIMIT:
                from numba.cuda.cudadrv.driver import binding, driver

                cufunc = self._compiled._codelibrary.get_cufunc()
                attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                driver.cuKernelSetAttribute(attr, self.dynamic_shared, cufunc.handle, cufunc.device.id)

    def resources(self):
        """Registers, local and static shared bytes per thread/block (None in the simulator)."""
        if self._compiled is None:
            return None
        attrs = self._compiled._codelibrary.get_cufunc().attrs
        return {"registers": attrs.regs, "local_bytes": attrs.local, "static_shared_bytes": attrs.shared}

    def resident_blocks(self, threads):
        """Blocks of ``threads`` threads (with the dynamic shared memory) that fit on the GPU at once, all SMs;
        in the simulator, which runs blocks one after another, two - enough for a persistent block to walk
        several tiles."""
        if self._compiled is None:
            return 2
        return self._compiled.max_cooperative_grid_blocks(threads, self.dynamic_shared)

    def bind(self, grid, block, stream, args):
        """A launch with its arguments converted now; calling it launches the kernel."""
        return BoundLaunch(self, grid, block, stream, args)

    def __call__(self, grid, block, stream, args):
        self.bind(grid, block, stream, args)()


def scalar_ctype(ty):
    """The ctypes type the driver expects for a numba scalar kernel argument (int32 -> c_int32, float32 -> c_float)."""
    return np.ctypeslib.as_ctypes_type(np.dtype(str(ty)))


class BoundLaunch:
    def __init__(self, compiled, grid, block, stream, args):
        self.compiled = compiled
        self.grid = tuple(grid)
        if SIMULATOR:
            self._args = [_flat(a) if hasattr(a, "copy_to_host") else a for a in args]
            # Configure at each call: the simulator's kernel[...] keeps the launch configuration on the
            # kernel object itself, so two bindings of one kernel would otherwise share the last one's grid.
            self._launch = lambda *a: compiled.kernel[grid, block, stream or 0, compiled.dynamic_shared](*a)
            return
        from cuda.core import LaunchConfig, launch
        from numba.cuda.cudadrv.driver import _to_core_stream

        kernelargs = []
        for ty, value in zip(compiled.signature, args):
            if isinstance(ty, types.Array):
                if not value.is_c_contiguous():
                    raise ValueError("kernel arguments must be C-contiguous device arrays")
                n, itemsize = int(value.size), int(np.dtype(value.dtype).itemsize)
                if np.dtype(value.dtype) != np.dtype(str(ty.dtype)):
                    raise TypeError(f"kernel argument: expected {ty.dtype} array, got {value.dtype}")
                kernelargs += [0, 0, n, itemsize, value.device_ctypes_pointer.value or 0, n, itemsize]
            else:
                kernelargs.append(scalar_ctype(ty)(value))
        self._keepalive = list(args)  # the buffers must outlive every launch of this binding
        self._launch = launch
        self._stream = _to_core_stream(stream or cuda.default_stream())
        self._config = LaunchConfig(grid=grid, block=block, shmem_size=compiled.dynamic_shared)
        self._kernel = compiled._compiled._codelibrary.get_cufunc().kernel
        self._kernelargs = kernelargs

    def __call__(self):
        if SIMULATOR:
            self._launch(*self._args)
        else:
            self._launch(self._stream, self._config, self._kernel, *self._kernelargs)
