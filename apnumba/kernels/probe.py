"""Small kernels that exercise one instruction: fragment checks and the peak microbenchmark.

``tile_kernel(shape, op)``: one warp per block computes one b1 tile product
``D = popc(A op B) + C`` straight from global memory, fragments loaded by the
layout in :mod:`apnumba.kernels.ptx`::

    m16n8k256: A[tile] (16 rows x 8 words), B[tile] (8 cols x 8 words), C, D (16 x 8) int32
    m8n8k128:  A[tile] (8 rows x 4 words),  B[tile] (8 cols x 4 words), C, D (8 x 8) int32

``peak_kernel(shape, op, chains)``: ``chains`` independent accumulators per warp
in a register-only loop - the instruction-rate ceiling bench.py measures.
"""

import functools

from numba import cuda, int32

from . import ptx

MMA_SHAPES = {"m16n8k256": (16, 8, 256), "m8n8k128": (8, 8, 128)}


def _op(shape, op):
    return getattr(ptx, f"mma_{shape}_{op}")


@functools.lru_cache(maxsize=None)
def tile_kernel(shape, op):
    mma = _op(shape, op)
    if shape == "m16n8k256":

        def kernel(a, b, c, d):
            tile = cuda.blockIdx.x
            lane = cuda.threadIdx.x
            g = lane >> 2
            t = lane & 3
            A = tile * 128  # 16 rows x 8 words
            B = tile * 64  # 8 cols x 8 words
            C = tile * 128  # 16 x 8
            r = mma(
                a[A + g * 8 + t], a[A + (g + 8) * 8 + t], a[A + g * 8 + 4 + t], a[A + (g + 8) * 8 + 4 + t],
                b[B + g * 8 + t], b[B + g * 8 + 4 + t],
                c[C + g * 8 + 2 * t], c[C + g * 8 + 2 * t + 1], c[C + (g + 8) * 8 + 2 * t], c[C + (g + 8) * 8 + 2 * t + 1],
            )
            d[C + g * 8 + 2 * t] = r[0]
            d[C + g * 8 + 2 * t + 1] = r[1]
            d[C + (g + 8) * 8 + 2 * t] = r[2]
            d[C + (g + 8) * 8 + 2 * t + 1] = r[3]

    else:

        def kernel(a, b, c, d):
            tile = cuda.blockIdx.x
            lane = cuda.threadIdx.x
            g = lane >> 2
            t = lane & 3
            A = tile * 32  # 8 rows x 4 words
            C = tile * 64  # 8 x 8
            r = mma(a[A + g * 4 + t], b[A + g * 4 + t], c[C + g * 8 + 2 * t], c[C + g * 8 + 2 * t + 1])
            d[C + g * 8 + 2 * t] = r[0]
            d[C + g * 8 + 2 * t + 1] = r[1]

    kernel.__name__ = kernel.__qualname__ = f"tile_{shape}_{op}"
    return cuda.jit(kernel)


TILE_SIGNATURE = "void(uint32[::1], uint32[::1], int32[::1], int32[::1])"


@functools.lru_cache(maxsize=None)
def peak_kernel(shape, op, chains):
    """Each warp runs ``iters`` rounds of ``chains`` independent mma on register operands."""
    mma = _op(shape, op)
    CHAINS = chains
    WIDE = shape == "m16n8k256"

    def kernel(iters, seed, out):
        lane = cuda.threadIdx.x & 31
        a = int32(seed ^ lane)
        b = int32((seed * 7) ^ lane)
        acc = cuda.local.array((CHAINS, 4), int32)
        for c in range(CHAINS):
            for e in range(4):
                acc[c, e] = 0
        for _ in range(iters):
            for c in range(CHAINS):
                if WIDE:
                    r = mma(a, a + c, a ^ c, b, b + c, b ^ c, acc[c, 0], acc[c, 1], acc[c, 2], acc[c, 3])
                    acc[c, 0] = r[0]
                    acc[c, 1] = r[1]
                    acc[c, 2] = r[2]
                    acc[c, 3] = r[3]
                else:
                    r = mma(a ^ c, b + c, acc[c, 0], acc[c, 1])
                    acc[c, 0] = r[0]
                    acc[c, 1] = r[1]
        total = int32(0)
        for c in range(CHAINS):
            for e in range(4):
                total += acc[c, e]
        out[cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x] = total

    kernel.__name__ = kernel.__qualname__ = f"peak_{shape}_{op}_x{chains}"
    return cuda.jit(kernel)


PEAK_SIGNATURE = "void(int32, int32, int32[::1])"


def ops_per_mma(shape):
    m, n, k = MMA_SHAPES[shape]
    return 2 * m * n * k
