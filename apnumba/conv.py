"""``apconv``: 2-D convolution of packed NHWC activations by packed weights, as an implicit GEMM.

    Y[n, oh, ow, k] = sum_{r, s, c} (W[k, r, s, c] - zw) (X[n, oh*stride - pad + r, ow*stride - pad + s, c] - zx)

with zero padding meaning the value 0 in every encoding (as torch's Conv2d on the dequantized
values); ``apnumba.reference`` (convolution section) derives the border corrections.
"""

import dataclasses
import functools

import numpy as np
from numba import cuda, float32, int32, uint32

from . import reference, tuning
from .device import check_accumulator, is_device_array, require_gpu, zero_fill
from .kernels.apmm import apconv_kernel, conv_geometry
from .kernels.launch import CompiledKernel
from .matmul import _check_wgmma, _coef, _ones_zeros, _vector, _wgmma_ok
from .packed import PackedTensor
from .precision import Precision, check_zero_point, normalize_scale


class PackedConvWeight:
    """Weights (K, R, S, C) packed for APConv: rows k, R*S taps each of ``tap_words`` words, padded to whole
    k-steps (``reference.pack_conv_weight``);
    ``packing`` "bits" (planes) or "bytes" (int8 values, for byte-packed activations)."""

    def __init__(self, words, rowsum, tap_sums, shape, precision, scale=1.0, zero_point=0, packing="bits"):
        self.precision = Precision.parse(precision)
        self.packing = reference.check_packing(packing)
        self.shape = tuple(int(v) for v in shape)
        K, R, S, C = self.shape
        self.cwords = reference.padded_words(C, packing)  # an input pixel's words
        self.tap_words = reference.conv_tap_words(C, packing)  # a tap's words along K
        self.kwords = reference.conv_kwords(R, S, C, packing)
        expect = (self.planes, K, self.kwords)
        if tuple(words.shape) != expect:
            raise ValueError(f"words: expected {expect}, got {tuple(words.shape)}")
        self.words, self.rowsum, self.tap_sums = words, rowsum, tap_sums
        self.scale = normalize_scale(scale, K)
        self.zero_point = check_zero_point(self.precision, zero_point)

    out_channels = property(lambda self: self.shape[0])
    planes = property(lambda self: reference.planes(self.precision, self.packing))

    @classmethod
    def from_codes(cls, codes, precision, scale=1.0, zero_point=0, packing="bits"):
        """Pack host integer codes (K, R, S, C) and upload them (once, at load)."""
        require_gpu()
        precision = Precision.parse(precision)
        codes = precision.check_codes(np.asarray(codes), "codes")
        words, rowsum, taps = reference.pack_conv_weight(codes, precision, packing)
        return cls(cuda.to_device(words), cuda.to_device(rowsum), cuda.to_device(taps.ravel()), codes.shape,
                   precision, scale, zero_point, packing)


_OUT_TYPES = {"i32": int32, "f32": float32, "pack": uint32, "pack_max": uint32, "pack_avg": uint32}


def _signature(out):
    out = {False: "i32", True: "f32"}.get(out, out)
    words, i32s = uint32[::1], int32[::1]
    return (words, words, int32, int32, int32, i32s, i32s, i32s, int32, int32, int32,
            i32s, i32s, i32s, float32[::1], float32[::1], _OUT_TYPES[out][::1], i32s, i32s, words, float32, i32s,
            i32s, uint32[::1])


@functools.lru_cache(maxsize=None)
def launcher(p, q, config, out, mma="b1", epilogue=None, word_taps=False):
    return CompiledKernel(apconv_kernel(p, q, config, out, mma, epilogue, word_taps), _signature(out),
                          config.shared_bytes(p, q, True))


@functools.lru_cache(maxsize=None)
def _dummy(dtype):
    return cuda.device_array(1, dtype)


def _split_buffers(cfg, M, N):
    """Split K's workspace and tile counters (zeroed once; each launch leaves them zero), or dummies."""
    if cfg.split_k == 1:
        return _dummy(np.int32), _dummy(np.uint32)
    words = cfg.split_words(M, N)
    if words >= 2**31:
        raise ValueError(f"config: split_k={cfg.split_k} needs a workspace of {words} int32, at most 2**31 - 1; split less")
    return cuda.device_array(words, np.int32), cuda.to_device(np.zeros(cfg.blocks(M, N), np.uint32))


@functools.lru_cache(maxsize=None)
def _geometry(values):
    return cuda.to_device(np.asarray(values, np.int32))


# Blocks of eight warps at least: one- and two-warp blocks issue at a fraction of the rate (H100, same run:
# APNN-TC sweep w1a2 C = K = 256 / 512 8.0 / 11.1 us with the cost model's one-warp tiles, 5.1 / 6.1 with
# its best of eight warps; ResNet-18's layer4 1x1/2 downsample at batch 8 8.5 -> 6.8 us, w1a1 layer4 3x3
# 23.5 -> 10.0).
MIN_CONV_THREADS = 256


def conv_config(p, q, M, N, K, packed=False, mma="b1"):
    """On an H100, ``tuning.hopper_conv_config`` where the grid is large (a wgmma tile).  Else the cost
    model's best tile with at most 16 mma per warp (the gather keeps more registers live); a packed
    output needs whole 32-channel words per block (block_m a multiple of 32).  Where the grid has blocks
    for two per SM, one k-step a stage: more k-steps a stage cost ~40 registers, so one block per SM
    instead of two, and were 1.3-1.6x slower on every ResNet-18 3x3 layer at batch 256 (H100).
    96 or 192 output channels may take 96-row tiles (three m16 tiles a warp): no idle padding rows.
    Blocks of MIN_CONV_THREADS at least where the model offers one; a grid of one wave or less is built
    with launch bounds (``min_blocks=1``).  An int32 / float32 output of few tiles and a long K splits K
    over two blocks (``tuning.hopper_split_conv_config``)."""
    hopper = tuning.hopper_conv_config(p, q, M, N, K) if _wgmma_ok(mma) else None
    if hopper is None and not packed and _wgmma_ok(mma):
        hopper = tuning.hopper_split_conv_config(p, q, M, N, K)
    if hopper is not None:
        return hopper
    fits = [cfg for cfg in tuning.candidates(p, q, M, N, K, limit=64, three_m_tiles=True)
            if cfg.mma_per_step(p, q) <= 16 and cfg.shared_bytes(p, q, True) <= tuning.MAX_SHARED_PER_BLOCK
            and not (packed and cfg.block_m % 32)]
    cfg = next((c for c in fits if c.threads >= MIN_CONV_THREADS), fits[0] if fits else None)
    if cfg is None:
        return tuning.TileConfig(2, 1, 1, 1, 2)
    if cfg.steps > cfg.warps_k and cfg.blocks(M, N) >= 2 * tuning.SMS:
        cfg = dataclasses.replace(cfg, stage_steps=0)
    if cfg.blocks(M, N) <= tuning.SMS:
        # One wave, a block an SM: launch bounds (min_blocks=1) let ptxas give each ldmatrix of a stage its
        # own registers.  Without them it minimises registers (69 on APNN-TC's C = K = 1024 tile) and loads
        # a k-step's second A fragment into the registers its first mma reads - each ldmatrix waits for
        # the mma before it.  (Larger grids keep their two blocks an SM.)
        cfg = dataclasses.replace(cfg, min_blocks=1)
    return cfg


MAX_LEVELS = 7  # threshold comparisons per channel, at most (3-bit outputs)


def _thresholds(scale, bias, K, out, relu):
    """(levels, device thresholds) of ``reference.requantize_thresholds`` for a packed output of at most
    MAX_LEVELS code steps whose scale and bias are host values (device ones may change after this
    call, and the kernel reads them at launch), or (0, a dummy): the float32 epilogue then runs."""
    if any(is_device_array(v) for v in (scale, bias) if v is not None):
        return 0, _dummy(np.int32)
    scale = np.ones(K, np.float32) if scale is None else np.asarray(scale, np.float32)
    bias = np.zeros(K, np.float32) if bias is None else np.asarray(bias, np.float32)
    _, levels = reference.threshold_levels(out.precision)
    if levels > MAX_LEVELS or scale.shape != (K,) or bias.shape != (K,):
        return 0, _dummy(np.int32)  # (bad shapes: _vector below says what was expected)
    table = reference.requantize_thresholds(scale, bias, out.precision, out.zero_point, relu)
    return (0, _dummy(np.int32)) if table is None else (levels, cuda.to_device(table.reshape(-1)))


def apconv(x, w, stride=1, padding=0, *, out=None, scale=None, bias=None, relu=False, residual=None,
           residual_scale=1.0, pool=None, config=None, stream=0):
    """Convolve packed NHWC images ``x`` by ``w``; see :func:`prepare_apconv` for every argument."""
    launch = prepare_apconv(x, w, stride, padding, out=out, scale=scale, bias=bias, relu=relu, residual=residual,
                            residual_scale=residual_scale, pool=pool, config=config, stream=stream)
    launch()
    return launch.out


def prepare_apconv(x, w, stride=1, padding=0, *, out=None, scale=None, bias=None, relu=False, residual=None,
                   residual_scale=1.0, pool=None, config=None, stream=0, rowsums=None):
    """Convolve packed NHWC images ``x`` (a PackedTensor with ``image``) by ``w`` (PackedConvWeight).

    Output, by ``out``:
    - None or a device array (N, OH, OW, K): int32 sums, or float32 ``y * scale[k] + bias[k]`` if scale
      or bias is given;
    - a PackedTensor (N*OH*OW rows, K channels): the fused epilogue writes the next layer's input -
      ``t = y * scale[k] + bias[k]``, plus ``(residual - zr) * residual_scale`` (a PackedTensor of the
      output's shape), ReLU if ``relu``, then ``out``'s quantizer with scale 1 (so fold the next layer's
      scale into scale and bias) - exactly :func:`apnumba.reference.requantize`, then packed as ``out``
      is: bit planes, or code bytes (``packing="bytes"``: the input of an int8 next layer);
      with ``pool="max"`` or ``"avg"``, a 2x2 stride-2 pooling of the ReLU'd values comes before the
      quantizer (:func:`apnumba.reference.requantize_pool`; floor mode, no residual) and ``out`` has
      N * (OH // 2) * (OW // 2) rows.
    Returns a launch (arguments converted once; calling it launches, and zeroes a packed output's
    row sums first where the tile's blocks add into them); ``.out`` is the output, ``.config`` the tile.
    ``rowsums``: where the blocks add into the row sums, ``out.rowsum = rowsums(rows)`` instead, which
    the caller zeroes before each launch (a network: all of a pass's such sums with one memset).
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
    if x.packing != w.packing:
        raise ValueError(f"x, w: packings differ: x is {x.packing!r}, w is {w.packing!r} (both bits or both bytes)")
    for name, v, least in (("stride", stride, 1), ("padding", padding, 0)):
        if int(v) != v or v < least:
            raise ValueError(f"{name}: expected an integer >= {least}, got {v!r}")
    OH, OW = reference.conv_output_size(H, R, stride, padding), reference.conv_output_size(W, S, stride, padding)
    check_accumulator(R * S * C, w.precision, x.precision, w.zero_point, x.zero_point)
    M, Npix = K, N * OH * OW
    packed = isinstance(out, PackedTensor)
    if pool is not None:
        if pool not in ("max", "avg"):
            raise ValueError(f"pool: expected None, 'max' or 'avg' (2x2, stride 2), got {pool!r}")
        if not packed or residual is not None:
            raise ValueError("pool: the fused pooling needs a packed output (out=PackedTensor) and no residual")
        if OH < 2 or OW < 2:
            raise ValueError(f"pool: a 2x2 pooling needs at least 2x2 output pixels, the convolution gives {OH}x{OW}")
        Npix = N * (OH // 2) * (OW // 2) * 4  # GEMM rows: each pooling window's 4 pixels, window by window
    ones, zeros = _ones_zeros(K)
    if packed:
        out_rows = Npix // 4 if pool else Npix
        if out.shape != (out_rows, K):
            raise ValueError(f"out: expected a PackedTensor of shape {(out_rows, K)}, got {out.shape}")
        kind = f"pack_{pool}" if pool else "pack"
        if out.compact:
            raise ValueError("out: a compact tensor (one word a pixel) is an image's input only; allocate a padded one")
        epi = [out.bits, out.precision.encoding.code, out.zero_point, int(bool(relu)), 0, 0, 0, out.kwords, 0]
        res_words = _dummy(np.uint32)
        if residual is not None:
            if not isinstance(residual, PackedTensor) or residual.shape != (Npix, K):
                raise ValueError(f"residual: expected a PackedTensor of shape {(Npix, K)}")
            residual.require_bits("residual", "the fused epilogue's residual add")
            epi[4:7] = [residual.bits, residual.precision.encoding.code, residual.zero_point]
            epi[8] = residual.kwords
            res_words = residual.words
        y = out.words
        out.image = (N, OH // 2, OW // 2) if pool else (N, OH, OW)
    else:
        if relu or residual is not None:
            raise ValueError("relu, residual: only the packed output (out=PackedTensor) applies them")
        kind = "f32" if scale is not None or bias is not None else "i32"
        dtype = np.float32 if kind == "f32" else np.int32
        shape = (N, OH, OW, K)
        if out is None:
            out = cuda.device_array(shape, dtype)
        elif tuple(out.shape) != shape or np.dtype(out.dtype) != dtype:
            raise ValueError(f"out: expected {np.dtype(dtype).name} {shape}, got {np.dtype(out.dtype).name} {tuple(out.shape)}")
        y, y_rowsum, res_words, epi = out, _dummy(np.int32), _dummy(np.uint32), [0] * 9
    for name, t in (("x", x), ("out", out if packed else None), ("residual", residual)):
        if t is not None and t.words.size >= 2**31:  # the kernel's index arithmetic is 32-bit
            raise ValueError(f"{name}: {t.words.size} packed words, at most 2**31 - 1 (8 GiB) per tensor: split the batch")
    p, q, packing = w.planes, x.planes, x.packing
    mma = reference.mma_kind(w.precision, x.precision, packing)
    cfg = config or conv_config(p, q, M, Npix, w.kwords * 32, packed, mma)
    _check_wgmma(cfg, mma)
    dw, dx = reference.operand_coef(w.precision, packing)[1], reference.operand_coef(x.precision, packing)[1]
    ew, ex = dw - w.zero_point, dx - x.zero_point
    whole_rows = M <= cfg.block_m  # one block holds every channel of a pixel: it stores the row sum
    zero_rowsum = packed and not whole_rows
    if zero_rowsum and rowsums is not None:
        out.rowsum, zero_rowsum = rowsums(out.rows), False
    if packed:
        y_rowsum = out.rowsum
    levels, thresholds = 0, _dummy(np.int32)
    if packed and residual is None and pool is None:  # (with a fused 2x2 max pool they measured slower: VGG
        levels, thresholds = _thresholds(scale, bias, K, out, relu)  # conv2 at batch 256, +3-14%)
    epilogue = (epi[0], epi[1], epi[4], epi[5], whole_rows, levels, out.packing == "bytes") if packed else None
    split_ws, split_count = _split_buffers(cfg, M, Npix)
    bound = launcher(p, q, cfg, kind, mma, epilogue, w.tap_words == 1).bind(
        cfg.launch_grid(M, Npix), (cfg.threads,), stream,
        (w.words, x.words, M, Npix, w.kwords, _geometry(conv_geometry(H, W, x.kwords, R, S, int(stride), int(padding), OH, OW, C, w.tap_words,
                                                               pool is not None)),
         _coef(w.precision, packing), _coef(x.precision, packing), ex, ew, ew * ex - ex * dw - ew * dx, w.rowsum, w.tap_sums, x.rowsum,
         _vector(scale, K, "scale", ones), _vector(bias, K, "bias", zeros), y, y_rowsum,
         _geometry(tuple(int(v) for v in epi)), res_words, float(residual_scale), thresholds, split_ws, split_count),
    )

    def launch():
        if zero_rowsum:  # the blocks of a pixel add their row sums atomically
            zero_fill(out.rowsum, stream or cuda.default_stream())
        bound()

    launch.out, launch.config, launch.compiled = out, cfg, bound.compiled
    launch.split_count = split_count  # (split K's tile counters: zero between launches)
    return launch
