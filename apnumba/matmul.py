"""``apmm``: the arbitrary-precision matrix product on packed tensors, and a convenience path from arrays.

    Y[m, n] = sum_k W[m, k] X[n, k]        W: PackedTensor (M, K), p bits; X: PackedTensor (N, K), q bits

Output int32, or float32 ``Y * scale[m] + bias[m]`` (rounded after the multiply
and after the add, exactly as numpy computes it in float32).
"""

import functools

import numpy as np
from numba import cuda, float32, int32, uint32

from . import reference, tuning
from .device import (as_device_array, check_accumulator, compute_capability, device_name, gpu_available, is_device_array,
                     require_gpu)
from .kernels.apmm import apmm_kernel
from .kernels.launch import CompiledKernel
from .kernels.ptx import SIMULATOR
from .packed import PackedTensor
from .precision import Precision


def _signature(out_float):
    words, i32s = uint32[::1], int32[::1]
    return (
        words, words, int32, int32, int32, i32s, i32s, int32, int32, int32,
        i32s, i32s, float32[::1], float32[::1], (float32 if out_float else int32)[::1], int32, int32,
    )


@functools.lru_cache(maxsize=None)
def launcher(p, q, config, out_float, mma="b1"):
    """The compiled kernel for (p, q planes, config, output type, mma kind), ready to launch."""
    kernel = apmm_kernel(p, q, config, out_float, mma)
    return CompiledKernel(kernel, _signature(out_float), config.shared_bytes(p, q))


@functools.lru_cache(maxsize=None)
def _coef(precision, packing="bits"):
    return cuda.to_device(np.asarray(reference.operand_coef(precision, packing)[0], dtype=np.int32))


@functools.lru_cache(maxsize=None)
def _ones_zeros(n):
    return cuda.to_device(np.ones(n, np.float32)), cuda.to_device(np.zeros(n, np.float32))


def _check_operands(w, x):
    for name, t in (("w", w), ("x", x)):
        if not isinstance(t, PackedTensor):
            raise TypeError(f"{name}: expected a PackedTensor, got {type(t).__name__}")
        if t.compact:
            raise ValueError(f"{name}: a compact PackedTensor (one word a pixel, PackedTensor.from_image) is a "
                             "convolution input only; apmm reads rows padded to whole k-steps")
    if w.K != x.K:
        raise ValueError(f"w, x: reduction lengths differ: w is {w.shape} (K={w.K}), x is {x.shape} (K={x.K})")
    if w.packing != x.packing:
        raise ValueError(f"w, x: packings differ: w is {w.packing!r}, x is {x.packing!r} (pack both as bits or both as bytes)")
    check_accumulator(w.K, w.precision, x.precision, w.zero_point, x.zero_point)


def _vector(v, M, name, default):
    """A float32 device vector of M values (host values are converted and copied over)."""
    if v is None:
        return default
    if not is_device_array(v):
        v = np.asarray(v, dtype=np.float32)
    d = as_device_array(v, name, dtypes=(np.float32,), ndim=1)
    if d.shape[0] != M:
        raise ValueError(f"{name}: expected {M} values (one per row of w), got {d.shape[0]}")
    return d


def _model_k(K, mma):
    """The K the tile model sees: its k-steps are 256 bits, and a byte k-step holds 32 values."""
    return K if mma == "b1" else reference.padded_words(K, "bytes") * 32


def _wgmma_ok(mma="b1"):
    """wgmma (sm_90a) tiles run here: an sm_90 GPU (numba builds its kernels for sm_90a), b1 planes
    (False without a GPU: tile choices are also made - and tested - on machines without one)."""
    return mma == "b1" and not SIMULATOR and gpu_available() and compute_capability() == (9, 0)


def _check_wgmma(cfg, mma):
    if cfg.wgmma and not _wgmma_ok(mma):
        raise ValueError(f"config: {cfg.short()} is a wgmma tile: it needs an sm_90 GPU (H100 / H200) and bit planes, "
                         f"this is compute capability {compute_capability()} with {mma!r} operands")


def choose_config(p, q, M, N, K, out_float, autotune=False, mma="b1"):
    """Cached autotuned choice if there is one, else (autotune=True) tune now, else the model's best
    (on an H100, wgmma tiles for large products: ``tuning.hopper_config``)."""
    key = tuning.cache_key(device_name(), p, q, M, N, K, out_float, mma)
    cfg = tuning.cached_config(key)
    if cfg is not None and (not cfg.wgmma or _wgmma_ok(mma)):
        return cfg
    if autotune and not SIMULATOR:
        return autotune_config(p, q, M, N, K, out_float, key, mma)
    hopper = tuning.hopper_config(p, q, M, N, K) if _wgmma_ok(mma) else None
    return hopper or tuning.default_config(p, q, M, N, _model_k(K, mma))


def autotune_config(p, q, M, N, K, out_float, key=None, mma="b1"):
    """Time the model's best few configurations (CUDA graph of calls); cache and return the fastest."""
    from .graph import gpu_time_per_call

    rng = np.random.default_rng(0)
    if mma == "b1":
        pw, px, packing = Precision(p, "unsigned"), Precision(q, "unsigned"), "bits"
    else:
        pw, px = (Precision(8, "signed" if t == "s8" else "unsigned") for t in mma.split("."))
        packing = "bytes"
    w = PackedTensor.from_codes(reference.random_codes(rng, (M, K), pw), pw, packing=packing)
    x = PackedTensor.from_codes(reference.random_codes(rng, (N, K), px), px, packing=packing)
    y = cuda.device_array((M, N), dtype=np.float32 if out_float else np.int32)
    scale = cuda.to_device(np.ones(M, np.float32)) if out_float else None
    stream = cuda.stream()
    calls = int(max(2, min(100, 2e4 / max(1.0, 2.0 * M * N * K * p * q / 8e9))))
    timings = {}
    tiles = tuning.candidates(p, q, M, N, _model_k(K, mma), limit=3)
    if _wgmma_ok(mma):
        tiles += [c for c in (tuning.hopper_config(p, q, M, N, K), tuning.wgmma_config(p, q, 2, 2)) if c is not None]
    for cfg in tiles:
        timings[cfg] = gpu_time_per_call(
            stream, lambda cfg=cfg: apmm(w, x, out=y, scale=scale, config=cfg, stream=stream), calls=calls, replays=3
        )
    best = min(timings, key=timings.get)
    tuning.store_config(
        key or tuning.cache_key(device_name(), p, q, M, N, K, out_float, mma), best,
        {c.short(): round(us, 3) for c, us in timings.items()},
    )
    return best


def apmm(w, x, *, out=None, scale=None, bias=None, out_dtype=None, layout="mn", config=None, autotune=False, stream=0):
    """Y[m, n] = sum_k (W[m, k] - zw)(X[n, k] - zx) on the binary tensor cores, exact.

    w, x:      PackedTensor (M, K) and (N, K), any precisions (``apnumba.precision``);
               zw, zx are their zero points (usually 0).
    out:       optional device array to write: (M, N) for layout "mn", (N, M) for "nm".
    scale, bias: per-row (M) float32; if either is given (or out_dtype is float32) the output is
               float32 ``Y * scale + bias`` (each operation rounded, as numpy does), else int32 ``Y``.
    config:    a TileConfig; by default the cached autotuned one, else the cost model's best
               (``autotune=True`` tunes on first use and caches the choice on disk).
    Returns the output device array.  For repeated calls on the same buffers, :func:`prepare_apmm`
    returns a launch whose call costs one driver launch.
    """
    launch = prepare_apmm(w, x, out=out, scale=scale, bias=bias, out_dtype=out_dtype, layout=layout,
                          config=config, autotune=autotune, stream=stream)
    launch()
    return launch.out


def prepare_apmm(w, x, *, out=None, scale=None, bias=None, out_dtype=None, layout="mn", config=None,
                 autotune=False, stream=0):
    """Check and bind everything :func:`apmm` would launch; call the result to launch (``.out`` is Y)."""
    require_gpu()
    _check_operands(w, x)
    M, N, K = w.rows, x.rows, w.K
    if out_dtype is not None and np.dtype(out_dtype) not in (np.dtype(np.int32), np.dtype(np.float32)):
        raise TypeError(f"out_dtype: expected int32 or float32, got {np.dtype(out_dtype).name}")
    out_float = scale is not None or bias is not None or np.dtype(out_dtype or np.int32) == np.float32
    if layout not in ("mn", "nm"):
        raise ValueError(f"layout: expected 'mn' (Y is M x N) or 'nm' (Y is N x M), got {layout!r}")
    shape = (M, N) if layout == "mn" else (N, M)
    dtype = np.float32 if out_float else np.int32
    if out is None:
        out = cuda.device_array(shape, dtype=dtype)
    else:
        if tuple(out.shape) != shape or np.dtype(out.dtype) != dtype:
            raise ValueError(f"out: expected {np.dtype(dtype).name} {shape}, got {np.dtype(out.dtype).name} {tuple(out.shape)}")
        if not out.is_c_contiguous():
            raise ValueError("out: expected a C-contiguous array")
        if not SIMULATOR and (out.device_ctypes_pointer.value or 0) % 16:
            raise ValueError("out: expected an array starting on a 16-byte boundary (the kernels store 8 and 16 bytes at "
                             f"once), got address {out.device_ctypes_pointer.value:#x}: a view into another array?")
    ones, zeros = _ones_zeros(M)
    scale_d = _vector(scale, M, "scale", ones)
    bias_d = _vector(bias, M, "bias", zeros)

    p, q, packing = w.planes, x.planes, w.packing
    mma = reference.mma_kind(w.precision, x.precision, packing)
    cfg = config or choose_config(p, q, M, N, K, out_float, autotune, mma)
    _check_wgmma(cfg, mma)
    kernel = launcher(p, q, cfg, out_float, mma)
    grid = cfg.grid(M, N)
    if cfg.persistent:  # as many blocks as run at once, each walking every so-many-th tile
        grid = (max(1, min(cfg.blocks(M, N), kernel.resident_blocks(cfg.threads))), 1)
    stride_m, stride_n = (N, 1) if layout == "mn" else (1, M)
    c_sw, c_sx, c_const = reference.correction_terms(w.precision, x.precision, K, w.zero_point, x.zero_point, packing)
    bound = kernel.bind(grid, (cfg.threads,), stream, (
        w.words, x.words, M, N, w.kwords, _coef(w.precision, packing), _coef(x.precision, packing), c_sw, c_sx, c_const,
        w.rowsum, x.rowsum, scale_d, bias_d, out, stride_m, stride_n,
    ))
    bound.out = out
    bound.config = cfg
    return bound


def matmul(w, x, pw, px, *, w_scale=1.0, x_scale=1.0, x_zero_point=0, out_float=False, config=None, packing="bits"):
    """Convenience: integer codes or floats (host or device) in, host numpy out.

    Integer arrays are taken as codes of ``pw`` / ``px``; float arrays are quantized
    (``w_scale`` per row or scalar, ``x_scale`` scalar) and packed on the GPU (``packing``:
    "bits", the b1 planes, or "bytes" for the int8 tensor cores).
    int32 ``W @ X.T`` out, or float32 ``W @ X.T * w_scale * x_scale`` with ``out_float``.
    """
    require_gpu()
    pw, px = Precision.parse(pw), Precision.parse(px)

    def packed(a, prec, scale, zp, name):
        dtype = np.dtype(a.dtype)
        if np.issubdtype(dtype, np.integer):
            host = a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)
            return PackedTensor.from_codes(host, prec, scale, zp, packing=packing)
        if dtype in (np.float32, np.float16):
            return PackedTensor.from_float(a, prec, scale, zp, packing=packing)
        raise TypeError(f"{name}: expected integer codes or float32/float16 values, got dtype {dtype.name}")

    W = packed(w, pw, w_scale, 0, "w")
    X = packed(x, px, x_scale, x_zero_point, "x")
    if out_float:
        if not (X.scale == X.scale[0]).all():
            raise ValueError("x_scale: expected one scale for all of x (a per-row x scale cannot be applied per m)")
        scale = W.scale * np.float32(X.scale[0])
        return apmm(W, X, scale=scale, config=config).copy_to_host()
    return apmm(W, X, config=config).copy_to_host()


