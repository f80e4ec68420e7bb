"""``apconv``: 2-D convolution of packed NHWC activations by packed weights, as an implicit GEMM.

    Y[n, oh, ow, k] = sum_{r, s, c} (W[k, r, s, c] - zw) (X[n, oh*stride - pad + r, ow*stride - pad + s, c] - zx)

with zero padding meaning the value 0 in every encoding (as torch's Conv2d on the dequantized
values); ``apnumba.reference`` (convolution section) derives the border corrections.
"""

import functools

import numpy as np
from numba import cuda, float32, int32, uint32

from . import reference, tuning
from .device import check_accumulator, require_gpu
from .kernels.apmm import apconv_kernel
from .kernels.launch import CompiledKernel
from .matmul import _coef, _ones_zeros, _vector
from .packed import PackedTensor
from .precision import Precision, check_zero_point, normalize_scale


class PackedConvWeight:
    """Weights (K, R, S, C) packed for APConv: rows k, R*S taps each of ``cwords`` words (reference.py)."""

    def __init__(self, words, rowsum, tap_sums, shape, precision, scale=1.0, zero_point=0):
        self.precision = Precision.parse(precision)
        self.shape = tuple(int(v) for v in shape)
        K, R, S, C = self.shape
        self.cwords = reference.padded_words(C)
        self.kwords = R * S * self.cwords
        if tuple(words.shape) != (self.precision.bits, K, self.kwords):
            raise ValueError(f"words: expected {(self.precision.bits, K, self.kwords)}, got {tuple(words.shape)}")
        self.words, self.rowsum, self.tap_sums = words, rowsum, tap_sums
        self.scale = normalize_scale(scale, K)
        self.zero_point = check_zero_point(self.precision, zero_point)

    out_channels = property(lambda self: self.shape[0])

    @classmethod
    def from_codes(cls, codes, precision, scale=1.0, zero_point=0):
        """Pack host integer codes (K, R, S, C) and upload them (once, at load)."""
        require_gpu()
        precision = Precision.parse(precision)
        codes = precision.check_codes(np.asarray(codes), "codes")
        words, rowsum, taps = reference.pack_conv_weight(codes, precision)
        return cls(cuda.to_device(words), cuda.to_device(rowsum), cuda.to_device(taps.ravel()), codes.shape,
                   precision, scale, zero_point)


def _signature(out_float):
    words, i32s = uint32[::1], int32[::1]
    return (words, words, int32, int32, int32, i32s, i32s, i32s, int32, int32, int32,
            i32s, i32s, i32s, float32[::1], float32[::1], (float32 if out_float else int32)[::1])


@functools.lru_cache(maxsize=None)
def launcher(p, q, config, out_float):
    return CompiledKernel(apconv_kernel(p, q, config, out_float), _signature(out_float), config.shared_bytes(p, q, True))


@functools.lru_cache(maxsize=None)
def _geometry(values):
    return cuda.to_device(np.asarray(values, np.int32))


def conv_config(p, q, M, N, K):
    """The cost model's best tile with at most 16 mma per warp (the gather keeps more registers live)."""
    for cfg in tuning.candidates(p, q, M, N, K, limit=64):
        if cfg.mma_per_step(p, q) <= 16 and cfg.shared_bytes(p, q, True) <= tuning.MAX_SHARED_PER_BLOCK:
            return cfg
    return tuning.TileConfig(1, 1, 1, 1, 2)


def apconv(x, w, stride=1, padding=0, *, out=None, scale=None, bias=None, config=None, stream=0):
    """Convolve packed NHWC images ``x`` (a PackedTensor with ``image``) by ``w`` (PackedConvWeight).

    Returns a device array (N, OH, OW, K): int32, or float32 ``y * scale[k] + bias[k]`` if scale or bias is given.
    """
    require_gpu()
    if not isinstance(x, PackedTensor) or x.image is None:
        raise TypeError("x: expected a PackedTensor of NHWC images (PackedTensor.from_codes / from_float of (N, H, W, C))")
    if not isinstance(w, PackedConvWeight):
        raise TypeError(f"w: expected a PackedConvWeight, got {type(w).__name__}")
    K, R, S, C = w.shape
    N, H, W = x.image
    if x.K != C:
        raise ValueError(f"x, w: x has {x.K} channels, w expects {C}")
    for name, v in (("stride", stride), ("padding", padding)):
        if int(v) != v or v < (1 if name == "stride" else 0):
            raise ValueError(f"{name}: expected an integer >= {1 if name == 'stride' else 0}, got {v!r}")
    OH, OW = reference.conv_output_size(H, R, stride, padding), reference.conv_output_size(W, S, stride, padding)
    check_accumulator(R * S * C, w.precision, x.precision, w.zero_point, x.zero_point)
    out_float = scale is not None or bias is not None
    dtype = np.float32 if out_float else np.int32
    shape = (N, OH, OW, K)
    if out is None:
        out = cuda.device_array(shape, dtype)
    elif tuple(out.shape) != shape or np.dtype(out.dtype) != dtype:
        raise ValueError(f"out: expected {np.dtype(dtype).name} {shape}, got {np.dtype(out.dtype).name} {tuple(out.shape)}")
    ones, zeros = _ones_zeros(K)
    p, q = w.precision.bits, x.precision.bits
    M, Npix = K, N * OH * OW
    cfg = config or conv_config(p, q, M, Npix, w.kwords * 32)
    dw, dx = w.precision.offset, x.precision.offset
    ew, ex = dw - w.zero_point, dx - x.zero_point
    geometry = _geometry((H, W, w.cwords, R, S, int(stride), int(padding), OH, OW, C))
    launcher(p, q, cfg, out_float).bind(
        (-(-Npix // cfg.block_n), -(-M // cfg.block_m)), (cfg.threads,), stream,
        (w.words, x.words, M, Npix, w.kwords, geometry, _coef(w.precision), _coef(x.precision),
         ex, ew, ew * ex - ex * dw - ew * dx, w.rowsum, w.tap_sums, x.rowsum,
         _vector(scale, K, "scale", ones), _vector(bias, K, "bias", zeros), out),
    )()
    return out
