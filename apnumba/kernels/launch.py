"""Compile-once, launch-cheaply helpers shared by the kernels' host code."""

import numpy as np
from numba import cuda

from .ptx import SIMULATOR

STATIC_SHARED_LIMIT = 48 * 1024


def compiled(kernel, signature, dynamic_shared=0):
    """Compile ``kernel`` for ``signature`` (once) and allow ``dynamic_shared`` bytes of dynamic shared memory.

    Returns a callable ``launch(grid, block, stream, args)`` that skips numba's
    per-call argument typing (the compiled kernel is looked up once).
    """
    if SIMULATOR:

        def launch(grid, block, stream, args):
            kernel[grid, block, stream, dynamic_shared](*args)

        return launch

    compiled_kernel = kernel.compile(signature)
    if dynamic_shared > STATIC_SHARED_LIMIT:
        from numba.cuda.cudadrv.driver import binding, driver

        cufunc = compiled_kernel._codelibrary.get_cufunc()
        attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        driver.cuKernelSetAttribute(attr, int(dynamic_shared), cufunc.handle, cufunc.device.id)

    def launch(grid, block, stream, args):
        compiled_kernel.launch(args, grid, block, stream or cuda.default_stream(), dynamic_shared)

    launch.kernel = compiled_kernel
    return launch


def resources(launch_fn):
    """Registers, local memory and shared memory of a compiled kernel (None in the simulator)."""
    k = getattr(launch_fn, "kernel", None)
    if k is None:
        return None
    attrs = k._codelibrary.get_cufunc().attrs
    return {"registers": attrs.regs, "local_bytes": attrs.local, "static_shared_bytes": attrs.shared}


def empty_i32(n=1):
    """A tiny int32 device array for arguments a kernel specialisation ignores."""
    return cuda.device_array(max(1, n), dtype=np.int32)
