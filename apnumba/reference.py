"""The golden reference: bit planes, the packed layout, and the emulated product, in numpy.

Packed layout (the one every GPU kernel reads and writes)
---------------------------------------------------------
A matrix of integer codes ``q`` with shape ``(rows, K)`` and ``b``-bit precision
is stored as ``uint32`` words, C-contiguous::

    words[plane, row, word]        shape (b, rows, kwords),  kwords = ceil(K / 256) * 8

    bit i (LSB = 0) of words[j, r, w]  =  bit j of the encoded code of q[r, 32 * w + i]

- K, the reduction axis, is packed: 32 consecutive k in a word, least significant
  bit first.  For a convolution K is the channel axis of an NHWC tensor.
- Planes are stored one after another, plane 0 (least significant) first; for
  ``signed`` the last plane is the two's-complement sign plane, for ``binary`` the
  single plane holds ``(v + 1) / 2``.
- Each row is padded with zero bits to a multiple of 256 bits (8 words, one
  ``m16n8k256`` k-step), so kernels need no K-edge test.  Rows are not padded.

Byte packing (``packing="bytes"``), for products where p * q plane pairs cost more than
the int8 tensor cores (a network's 8-bit first layer: 64 plane pairs, or 8 int8 mma per 256 k)::

    words[0, row, word]            shape (1, rows, kwords),  kwords = ceil(K / 32) * 8

    byte i of words[0, r, w]  =  the value of q[r, 4 * w + i] as an int8 (two's complement;
                                 unsigned codes as uint8; binary as -1 / +1), zero beyond K

One ``m16n8k32`` int8 k-step is 32 bytes = 8 words: the same rows of 8 words per k-step as a
b1 ``m16n8k256`` step, with the same fragment layout, so one kernel pipeline serves both.
The product is then ``sum_k w[m,k] x[n,k]`` directly (one plane, coefficient 1, offset 0).

The product (``apnumba.precision`` defines ``coef`` and ``offset``)
-------------------------------------------------------------------
With codes ``w = sum_j cw_j w_j + dw`` and ``x = sum_i cx_i x_i + dx`` (bits ``w_j``,
``x_i``; ``dw``, ``dx`` the encodings' offsets) and zero points ``zw``, ``zx``, the
product of the values the codes stand for is::

    sum_k (w[m,k] - zw)(x[n,k] - zx) = sum_ij cw_j cx_i popc(w_j[m] AND x_i[n])   (one b1 mma per plane pair)
                                     + c_sw * SW[m] + c_sx * SX[n] + c_const      (see correction_terms)

where ``SW[m] = sum_k w[m,k]`` and ``SX[n] = sum_k x[n,k]`` are row sums of the
codes, kept beside the packed words.  The terms vanish unless a side is binary
or has a zero point.  Only AND is used: XOR is emulated on
Hopper; for +-1 x +-1 this is the identity popc(a XOR b) = popc(a) + popc(b) - 2 popc(a AND b)
in disguise.  Padding bits are zero in every plane, so they add nothing to any popcount.
"""

import numpy as np

from .precision import Encoding, Precision, quantize

WORD_BITS = 32
K_ALIGN_BITS = 256  # one m16n8k256 k-step
K_ALIGN_WORDS = K_ALIGN_BITS // WORD_BITS


PACKINGS = ("bits", "bytes")
_PER_WORD = {"bits": WORD_BITS, "bytes": 4}  # K elements a word holds


def check_packing(packing):
    if packing not in PACKINGS:
        raise ValueError(f"packing: expected one of {PACKINGS}, got {packing!r}")
    return packing


def padded_words(K, packing="bits"):
    """Words per packed row for a reduction length K (one k-step is 8 words in either packing)."""
    if K < 1:
        raise ValueError(f"K: expected at least 1, got {K}")
    per_step = _PER_WORD[check_packing(packing)] * K_ALIGN_WORDS
    return -(-K // per_step) * K_ALIGN_WORDS


def operand_coef(precision, packing="bits"):
    """(coef, offset) of the planes the kernel multiplies: the precision's, or ((1,), 0) for bytes."""
    precision = Precision.parse(precision)
    return (precision.coef, precision.offset) if check_packing(packing) == "bits" else ((1,), 0)


def planes(precision, packing="bits"):
    """Planes of a packed tensor: ``bits`` bit planes, or one plane of bytes."""
    return Precision.parse(precision).bits if check_packing(packing) == "bits" else 1


def byte_type(precision):
    """The int8 mma operand type that holds a precision's values: u8 for unsigned, s8 otherwise."""
    return "u8" if Precision.parse(precision).encoding is Encoding.UNSIGNED else "s8"


def mma_kind(pw, px, packing="bits"):
    """The tensor-core product a kernel issues: "b1" (AND + popc), or "s8.u8"-style int8 types (W, X)."""
    return "b1" if check_packing(packing) == "bits" else f"{byte_type(pw)}.{byte_type(px)}"


def bytes_pay(pw, px, K):
    """True where int8 mma over bytes issue fewer products than b1 mma over plane pairs.

    Per row pair: p * q * ceil(K / 256) b1 mma against ceil(K / 32) int8 mma (the same issue rate
    on Hopper and Ampere); ties go to bytes (a cheaper pack).  8-bit first layers: always bytes."""
    pw, px = Precision.parse(pw), Precision.parse(px)
    return pw.bits * px.bits * padded_words(K) >= padded_words(K, "bytes")


def encode(codes, precision):
    """Integer codes -> the unsigned bit pattern (0 .. 2^b - 1) whose bits are the planes."""
    precision = Precision.parse(precision)
    v = precision.check_codes(codes, "codes").astype(np.int64)
    if precision.encoding is Encoding.BINARY:
        return ((v + 1) // 2).astype(np.uint8)
    return (v & ((1 << precision.bits) - 1)).astype(np.uint8)


def decode(pattern, precision):
    """Inverse of :func:`encode`: bit pattern -> int32 codes."""
    precision = Precision.parse(precision)
    p = np.asarray(pattern).astype(np.int64)
    v = sum(c * ((p >> j) & 1) for j, c in enumerate(precision.coef)) + precision.offset
    return np.asarray(v, dtype=np.int32)


def bit_planes(codes, precision):
    """codes (...) -> uint8 planes (b, ...); plane j is bit j of each encoded code."""
    precision = Precision.parse(precision)
    pattern = encode(codes, precision)
    return np.stack([(pattern >> j) & 1 for j in range(precision.bits)]).astype(np.uint8)


def from_planes(planes, precision):
    """uint8 planes (b, ...) -> int32 codes: ``sum_j coef[j] * plane_j + offset``."""
    precision = Precision.parse(precision)
    planes = np.asarray(planes)
    if planes.shape[0] != precision.bits:
        raise ValueError(f"planes: expected {precision.bits} planes for {precision}, got {planes.shape[0]}")
    v = sum(c * planes[j].astype(np.int64) for j, c in enumerate(precision.coef)) + precision.offset
    return np.asarray(v, dtype=np.int32)


def pack(codes, precision, packing="bits"):
    """int codes (rows, K) -> uint32 words (b, rows, kwords) in the packed layout (or (1, rows, kwords) of bytes)."""
    precision = Precision.parse(precision)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes: expected a 2-D (rows, K) array, got shape {codes.shape}")
    rows, K = codes.shape
    if check_packing(packing) == "bytes":
        v = precision.check_codes(codes, "codes").astype(np.int64)
        padded = np.zeros((rows, padded_words(K, packing) * 4), dtype=np.uint8)
        padded[:, :K] = (v & 0xFF).astype(np.uint8)
        return np.ascontiguousarray(padded).view("<u4").reshape(1, rows, -1).astype(np.uint32)
    kwords = padded_words(K)
    bits = bit_planes(codes, precision)  # (b, rows, K)
    padded = np.zeros((precision.bits, rows, kwords * WORD_BITS), dtype=np.uint8)
    padded[:, :, :K] = bits
    packed = np.packbits(padded.reshape(precision.bits, rows, kwords, WORD_BITS), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").reshape(precision.bits, rows, kwords).astype(np.uint32)


def unpack(words, precision, K, packing="bits"):
    """uint32 words (b, rows, kwords) -> int32 codes (rows, K)."""
    precision = Precision.parse(precision)
    words = np.ascontiguousarray(np.asarray(words, dtype=np.uint32))
    n_planes, kwords = planes(precision, packing), padded_words(K, packing)
    if words.ndim != 3 or words.shape[0] != n_planes or words.shape[2] != kwords:
        raise ValueError(
            f"words: expected shape ({n_planes}, rows, {kwords}) for {precision} ({packing}) and K={K}, "
            f"got {words.shape}"
        )
    if packing == "bytes":
        raw = words[0].view(np.uint8 if precision.encoding is Encoding.UNSIGNED else np.int8)[:, :K]
        return precision.check_codes(raw.astype(np.int32), "words")
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    return from_planes(bits[:, :, :K], precision)


def row_sums(codes):
    """int32 sum of each row's values: the ``SW`` / ``SX`` of the product."""
    return np.asarray(codes, dtype=np.int64).sum(axis=1).astype(np.int32)


def plane_popcounts(words_w, words_x):
    """int64 (Pw, Px, M, N): popc(w_j[m] AND x_i[n]) summed over the row, for every plane pair."""
    ww = np.asarray(words_w, dtype=np.uint32)
    xx = np.asarray(words_x, dtype=np.uint32)
    P, M, kw = ww.shape
    Q, N, _ = xx.shape
    out = np.empty((P, Q, M, N), dtype=np.int64)
    # Bound the (M, N, kwords) temporary to about 32 MB.
    step = max(1, (1 << 23) // max(1, N * kw))
    for j in range(P):
        for i in range(Q):
            for m0 in range(0, M, step):
                both = ww[j, m0 : m0 + step, None, :] & xx[i, None, :, :]
                out[j, i, m0 : m0 + step] = np.bitwise_count(both).sum(axis=-1, dtype=np.int64)
    return out


def correction_terms(pw, px, K, zw=0, zx=0, packing="bits"):
    """(c_sw, c_sx, c_const) of the module doc's formula.

    With ``ew = dw - zw`` and ``ex = dx - zx``: the bit planes give ``sum (w - dw)(x - dx)``;
    expanding ``(w - zw)(x - zx)`` around it gives
    ``c_sw = ex``, ``c_sx = ew``, ``c_const = -K (ex dw + ew dx - ew ex)``.  Bytes hold the
    values themselves: dw = dx = 0.
    """
    dw, dx = operand_coef(pw, packing)[1], operand_coef(px, packing)[1]
    ew, ex = dw - zw, dx - zx
    return ex, ew, -K * (ex * dw + ew * dx - ew * ex)


def combine_planes(popcounts, pw, px, sum_w, sum_x, K, zw=0, zx=0):
    """Combine plane-pair popcounts (Pw, Px, M, N) into the integer product (the module doc's formula)."""
    pw, px = Precision.parse(pw), Precision.parse(px)
    cw = np.asarray(pw.coef, dtype=np.int64)
    cx = np.asarray(px.coef, dtype=np.int64)
    c_sw, c_sx, c_const = correction_terms(pw, px, K, zw, zx)
    y = np.einsum("j,i,jimn->mn", cw, cx, popcounts)
    y = y + c_sw * np.asarray(sum_w, dtype=np.int64)[:, None]
    y = y + c_sx * np.asarray(sum_x, dtype=np.int64)[None, :]
    return y + c_const


def apmm(w_codes, x_codes, pw, px, zw=0, zx=0):
    """Y[m, n] = sum_k (W[m, k] - zw)(X[n, k] - zx) computed the way the GPU does: packed planes, AND, popc.

    Returns int64 so that a test can see an int32 overflow instead of wrapping into it.
    """
    pw, px = Precision.parse(pw), Precision.parse(px)
    w_codes = pw.check_codes(w_codes, "w")
    x_codes = px.check_codes(x_codes, "x")
    if w_codes.ndim != 2 or x_codes.ndim != 2 or w_codes.shape[1] != x_codes.shape[1]:
        raise ValueError(f"w, x: expected (M, K) and (N, K) with the same K, got {w_codes.shape} and {x_codes.shape}")
    K = w_codes.shape[1]
    counts = plane_popcounts(pack(w_codes, pw), pack(x_codes, px))
    return combine_planes(counts, pw, px, row_sums(w_codes), row_sums(x_codes), K, zw, zx)


def matmul_int(w_codes, x_codes, zw=0, zx=0):
    """Plain integer ``(W - zw) @ (X - zx).T`` in int64: what :func:`apmm` must equal."""
    return (np.asarray(w_codes, dtype=np.int64) - zw) @ (np.asarray(x_codes, dtype=np.int64) - zx).T


def random_codes(rng, shape, precision):
    """Uniformly random valid codes of ``precision``."""
    precision = Precision.parse(precision)
    if precision.encoding is Encoding.BINARY:
        return (2 * rng.integers(0, 2, size=shape) - 1).astype(np.int32)
    return rng.integers(precision.lo, precision.hi + 1, size=shape).astype(np.int32)


# ---------------------------------------------------------------- convolution
#
# Layouts.  Activations are NHWC: a PackedTensor whose rows are the pixels (n, h, w) in that order
# and whose K is the channel axis.  Weights (K_out, R, S, C) are packed as rows k_out with a
# reduction axis of R*S segments, one per filter tap (r, s) in that order, each C padded to a
# whole number of 256-bit k-steps (``padded_words(C)`` words); padding bits are zero.
#
# Zero padding means the value 0, as torch's Conv2d(padding=...) on the dequantized values.  The
# kernel gathers zero bits for taps outside the image; zero bits are the code ``offset`` (0, or -1
# for binary), which stands for the value offset - zp.  So a tap outside the image must drop out of
# every term: with V(n) valid taps for output pixel n, Kv = V(n) * C, and
#     SWv[m, n] = sum over valid taps of WS[m, tap]   (WS: per-tap code sums of the weights)
#     SXv[n]    = sum over valid taps of the input pixel's code sum (XS, the activations' rowsum)
# the product is
#     Y = sum_ij cw_j cx_i popc(...) + ex (SWv - Kv dw) + ew (SXv - Kv dx) + Kv ew ex
# with ew = dw - zw, ex = dx - zx (d: the encodings' offsets).  Interior pixels have V = R*S.


def conv_output_size(size, kernel, stride, padding):
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"conv: input {size} with kernel {kernel}, stride {stride}, padding {padding} gives no output")
    return out


def conv2d_int(x_codes, w_codes, stride=1, padding=0, zx=0, zw=0):
    """Plain integer convolution of the dequantized integers: NHWC (N,H,W,C) * (K,R,S,C) -> int64 (N,OH,OW,K)."""
    x = np.asarray(x_codes, dtype=np.int64) - zx
    w = np.asarray(w_codes, dtype=np.int64) - zw
    if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[3]:
        raise ValueError(f"x, w: expected (N,H,W,C) and (K,R,S,C) with the same C, got {x.shape} and {w.shape}")
    N, H, W, C = x.shape
    K, R, S, _ = w.shape
    OH, OW = conv_output_size(H, R, stride, padding), conv_output_size(W, S, stride, padding)
    xp = np.zeros((N, H + 2 * padding, W + 2 * padding, C), np.int64)
    xp[:, padding : padding + H, padding : padding + W] = x
    # float64 BLAS is exact while every partial sum stays below 2**53 (integer matmul in numpy is slow)
    exact = float(np.abs(x).max(initial=0)) * float(np.abs(w).max(initial=0)) * R * S * C < 2.0**53
    acc = np.float64 if exact else np.int64
    xp, w = xp.astype(acc), w.astype(acc)
    y = np.zeros((N, OH, OW, K), acc)
    for r in range(R):
        for s in range(S):
            patch = xp[:, r : r + stride * (OH - 1) + 1 : stride, s : s + stride * (OW - 1) + 1 : stride]
            y += patch @ w[:, r, s, :].T
    return y.astype(np.int64)


def conv_tap_words(C, packing="bits"):
    """Words one tap takes along K in the convolution's weight layout (and the kernel's gathered rows):
    1 where the channels fit one word (<= 32 bit-plane channels, <= 4 byte channels: an image's RGB),
    so eight taps share one mma; 4 - half a 256-bit k-step, one 16-byte copy - for bit planes of at
    most 128 channels; else the channels' padded words (whole k-steps)."""
    if C <= _PER_WORD[check_packing(packing)]:
        return 1
    if packing == "bits" and C <= 4 * WORD_BITS:
        return 4
    return padded_words(C, packing)


def conv_kwords(R, S, C, packing="bits"):
    """Words of a packed conv weight row: R*S taps of conv_tap_words(C) words, padded to whole k-steps."""
    return -(-R * S * conv_tap_words(C, packing) // K_ALIGN_WORDS) * K_ALIGN_WORDS


def pack_conv_weight(w_codes, precision, packing="bits"):
    """(K,R,S,C) codes -> (words (b, K, conv_kwords), rowsum (K,), tap sums (K, R*S)) in the conv layout:
    each tap's C packed and padded on its own to conv_tap_words(C) words, taps laid end to end (r, s
    order), the row padded with zeros to whole k-steps."""
    precision = Precision.parse(precision)
    w = precision.check_codes(np.asarray(w_codes), "w")
    if w.ndim != 4:
        raise ValueError(f"w: expected a (K, R, S, C) array, got shape {w.shape}")
    K, R, S, C = w.shape
    tap = conv_tap_words(C, packing)  # <= the padded words of a row of C: the rest is zero padding
    rows = pack(w.reshape(K * R * S, C), precision, packing)[:, :, :tap]
    words = np.zeros((rows.shape[0], K, conv_kwords(R, S, C, packing)), np.uint32)
    words[:, :, : R * S * tap] = rows.reshape(rows.shape[0], K, R * S * tap)
    taps = w.astype(np.int64).sum(axis=3).reshape(K, R * S).astype(np.int32)
    return words, taps.sum(axis=1).astype(np.int32), taps


def conv_taps(H, W, R, S, stride, padding):
    """For every output pixel (OH*OW of one image) and tap (R*S): the input pixel index, or -1 outside."""
    OH, OW = conv_output_size(H, R, stride, padding), conv_output_size(W, S, stride, padding)
    oh, ow = np.meshgrid(np.arange(OH), np.arange(OW), indexing="ij")
    ih = oh.reshape(-1, 1) * stride - padding + np.repeat(np.arange(R), S)[None, :]
    iw = ow.reshape(-1, 1) * stride - padding + np.tile(np.arange(S), R)[None, :]
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return np.where(inside, ih * W + iw, -1)


def conv2d(x_codes, w_codes, px, pw, stride=1, padding=0, zx=0, zw=0):
    """The convolution computed the way the GPU does: gathered bit planes, AND, popc, border corrections.

    Equals :func:`conv2d_int` (tests prove it).  Returns int64 (N, OH, OW, K).
    """
    px, pw = Precision.parse(px), Precision.parse(pw)
    x = px.check_codes(np.asarray(x_codes), "x")
    N, H, W, C = x.shape
    words_w, sum_w, taps_w = pack_conv_weight(w_codes, pw)
    K, R, S, _ = np.asarray(w_codes).shape
    taps = conv_taps(H, W, R, S, stride, padding)  # (P, R*S), P = OH*OW
    P = taps.shape[0]
    cw = conv_tap_words(C)
    words_x = pack(x.reshape(N * H * W, C), px).reshape(px.bits, N, H * W, -1)[..., :cw]
    # Implicit GEMM operand: per output pixel, the R*S taps' channel words, zero outside the image
    # and in the row's padding to whole k-steps (as the weights are).
    gathered = np.zeros((px.bits, N, P, R * S, cw), np.uint32)
    valid = taps >= 0
    for t in range(R * S):
        rows = valid[:, t]
        gathered[:, :, rows, t] = words_x[:, :, taps[rows, t]]
    padded = np.zeros((px.bits, N * P, words_w.shape[-1]), np.uint32)
    padded[:, :, : R * S * cw] = gathered.reshape(px.bits, N * P, R * S * cw)
    gathered = padded
    counts = plane_popcounts(words_w, gathered)  # (Pw, Px, K, N*P)
    cwv = np.asarray(pw.coef, np.int64)
    cxv = np.asarray(px.coef, np.int64)
    y = np.einsum("j,i,jimn->mn", cwv, cxv, counts)
    ew, ex = pw.offset - zw, px.offset - zx
    kv = np.tile(valid.sum(axis=1) * C, N)[None, :]  # valid reduction length per output pixel
    if ex:
        swv = np.tile(taps_w.astype(np.int64) @ valid.T.astype(np.int64), (1, N))  # (K, N*P)
        y += ex * (swv - kv * pw.offset)
    if ew:
        xs = x.astype(np.int64).sum(axis=3).reshape(N, H * W)
        sxv = np.where(valid[None], np.take_along_axis(xs[:, None, :].repeat(P, 1), np.maximum(taps, 0)[None], 2), 0)
        y += ew * (sxv.sum(axis=2).reshape(1, N * P) - kv * px.offset)
    y += kv * ew * ex
    OH, OW = conv_output_size(H, R, stride, padding), conv_output_size(W, S, stride, padding)
    return y.T.reshape(N, OH, OW, K)


# ---------------------------------------------------------------- the fused epilogue


def requantize(y, scale, bias, precision, zero_point=0, relu=False, residual=None, residual_zero_point=0,
               residual_scale=1.0):
    """The fused epilogue, in the kernel's float32 arithmetic (every operation rounded on its own):

        t = y * scale[c] + bias[c]                            y: int32 sums, c: the last (channel) axis
        t = t + (residual - residual_zero_point) * residual_scale    with a residual (codes, same shape)
        t = max(t, 0)                                          with relu (NaN -> 0)
        code = quantize(t, precision, scale=1, zero_point)     the next layer's codes

    Folding batch norm and the scales into (scale, bias) is the caller's business, done once in
    float64 and rounded to float32; both the GPU and this function start from those float32 values.
    """
    precision = Precision.parse(precision)
    with np.errstate(over="ignore"):  # float32 overflow is +-inf here, as on the GPU (quantize clamps it)
        t = np.asarray(y, np.int32).astype(np.float32) * np.asarray(scale, np.float32) + np.asarray(bias, np.float32)
    if residual is not None:
        r = (np.asarray(residual, np.int64) - residual_zero_point).astype(np.float32)
        t = t + r * np.float32(residual_scale)
    if relu:
        t = np.where(t > 0, t, np.float32(0))
    flat = t.reshape(-1, 1)
    return quantize(flat, precision, 1.0, zero_point).reshape(t.shape)


def threshold_levels(precision):
    """(step, levels) of a precision's codes: lo + step * k for k = 0 .. levels (step 2 for +-1 codes)."""
    precision = Precision.parse(precision)
    step = 2 if precision.encoding is Encoding.BINARY else 1
    return step, (precision.hi - precision.lo) // step


THRESHOLD_NEVER = 2**31 - 1  # no int32 sum is above it
THRESHOLD_ALWAYS = -(2**31)  # every int32 sum the products can give (|y| <= 2^31 - 1) is above it


def requantize_thresholds(scale, bias, precision, zero_point=0, relu=False):
    """The fused epilogue without a residual as integer comparisons, exact by construction.

    ``requantize`` is monotone in the int32 sum y for each channel (every float32 step is: rounding
    is monotone), non-decreasing for scale > 0 and non-increasing for scale < 0.  So with
    ``sign = -1 if scale < 0 else 1`` and step 2 for +-1 codes (else 1)::

        requantize(y) = lo + step * #{k : sign * y > T[c, k]}     for every |y| <= 2^31 - 1

    where T[c, k] + 1 is the smallest sign * y whose code reaches lo + step * (k + 1), found by a binary
    search over all of int32 with ``requantize`` itself (THRESHOLD_NEVER / _ALWAYS where no y or every y
    reaches it).  Returns int32 (K, 1 + levels): column 0 the sign, then the levels' thresholds; or
    None where the channel constants are not all finite (then the float path runs).
    """
    precision = Precision.parse(precision)
    scale = np.asarray(scale, np.float32).reshape(-1)
    bias = np.asarray(bias, np.float32).reshape(-1)
    if not (np.isfinite(scale).all() and np.isfinite(bias).all()):
        return None
    step, levels = threshold_levels(precision)
    sign = np.where(scale < 0, -1, 1).astype(np.int64)
    target = precision.lo + step * np.arange(1, levels + 1, dtype=np.int64)[:, None]  # (levels, 1)

    def reaches(yp):  # (levels, K) int64 values of sign * y -> code >= target
        codes = requantize((sign * yp).astype(np.int32), scale, bias, precision, zero_point, relu)
        return codes >= target

    lo = np.full((levels, scale.size), -(2**31 - 1), np.int64)  # the search interval [lo, hi] of sign * y
    hi = np.full((levels, scale.size), 2**31 - 1, np.int64)
    never, always = ~reaches(hi), reaches(lo)
    while (lo < hi).any():  # smallest sign * y that reaches the level (32 halvings)
        mid = (lo + hi) // 2
        up = reaches(mid)
        hi = np.where(up, mid, hi)
        lo = np.where(up, lo, mid + 1)
    thresholds = np.where(never, THRESHOLD_NEVER, np.where(always, THRESHOLD_ALWAYS, lo - 1))
    return np.concatenate([sign[:, None], thresholds.T], axis=1).astype(np.int32)


def requantize_by_thresholds(y, thresholds, precision):
    """Codes of int32 sums y (..., K) from ``requantize_thresholds`` (what the GPU epilogue computes)."""
    precision = Precision.parse(precision)
    step, _ = threshold_levels(precision)
    yp = np.asarray(y, np.int64)[..., None] * thresholds[:, 0].astype(np.int64)[:, None]
    return (precision.lo + step * (yp > thresholds[:, 1:]).sum(axis=-1)).astype(np.int32)


def planes_by_thresholds(y, thresholds, precision):
    """Bit planes (b, ..., K) of ``requantize_by_thresholds``'s codes, as the GPU epilogue forms them: the
    thresholds of a channel rise (the requantizer is monotone), so the passed ones are T_1 .. T_c, and bit
    j of c is the XOR of passing T_{2^j}, T_{2 * 2^j}, ... (floor(c / 2^j) odd); signed codes lo + c flip
    the top bit, +-1 codes -1 + 2c have the pattern c.  Needs 2^b - 1 levels (one for +-1 codes)."""
    precision = Precision.parse(precision)
    _, levels = threshold_levels(precision)
    yp = np.asarray(y, np.int64)[..., None] * thresholds[:, 0].astype(np.int64)[:, None]
    passed = yp > thresholds[:, 1:]  # (..., K, levels): threshold k + 1 passed
    planes = []
    for j in range(precision.bits):
        bit = np.full(passed.shape[:-1], precision.encoding is Encoding.SIGNED and j == precision.bits - 1)
        for m in range(1, levels // (1 << j) + 1):
            bit ^= passed[..., (m << j) - 1]
        planes.append(bit)
    return np.stack(planes).astype(np.uint8)


def requantize_pool(y, scale, bias, precision, zero_point=0, relu=False, mode="max"):
    """The fused epilogue with a 2x2 stride-2 pooling (floor mode) before the quantizer, in float32:

        t = y * scale[c] + bias[c], then max(t, 0) with relu      y: int32 sums (N, OH, OW, C)
        max:  t = max(max(t00, t01), max(t10, t11))              (t_dy dx: the window's pixels)
        avg:  t = ((t00 + t01) + (t10 + t11)) * 0.25             each operation rounded to float32
        code = quantize(t, precision, scale=1, zero_point)        -> (N, OH // 2, OW // 2, C)

    Max pooling commutes with the (monotone) quantizer, so "max" equals requantize then max_pool_codes.
    """
    if mode not in ("max", "avg"):
        raise ValueError(f"mode: expected 'max' or 'avg', got {mode!r}")
    y = np.asarray(y)
    N, OH, OW, C = y.shape
    if OH < 2 or OW < 2:
        raise ValueError(f"y: a 2x2 pooling needs at least 2x2 pixels, got {OH}x{OW}")
    t = y[:, : OH // 2 * 2, : OW // 2 * 2].astype(np.int32).astype(np.float32) * np.asarray(scale, np.float32)
    t = t + np.asarray(bias, np.float32)
    if relu:
        t = np.where(t > 0, t, np.float32(0))
    t = t.reshape(N, OH // 2, 2, OW // 2, 2, C)
    t00, t01, t10, t11 = t[:, :, 0, :, 0], t[:, :, 0, :, 1], t[:, :, 1, :, 0], t[:, :, 1, :, 1]
    if mode == "max":
        p = np.maximum(np.maximum(t00, t01), np.maximum(t10, t11))
    else:
        p = ((t00 + t01) + (t10 + t11)) * np.float32(0.25)
    return quantize(p.reshape(-1, 1), Precision.parse(precision), 1.0, zero_point).reshape(p.shape)


# ---------------------------------------------------------------- packed-tensor operations


def max_pool_codes(x_codes, kernel, stride, padding=0):
    """Max pooling of NHWC codes (taps outside the image are ignored, as torch's MaxPool2d)."""
    x = np.asarray(x_codes)
    N, H, W, C = x.shape
    OH, OW = conv_output_size(H, kernel, stride, padding), conv_output_size(W, kernel, stride, padding)
    taps = conv_taps(H, W, kernel, kernel, stride, padding)  # (OH*OW, k*k)
    flat = x.reshape(N, H * W, C).astype(np.int64)
    vals = np.where((taps >= 0)[None, :, :, None], flat[:, np.maximum(taps, 0)], np.iinfo(np.int64).min)
    return vals.max(axis=2).reshape(N, OH, OW, C).astype(np.int32)


def avg_pool_codes(x_codes, kernel, stride, padding, precision, zero_point, multiplier, out_precision, out_zero_point):
    """Average pooling of NHWC codes into ``out_precision``: padding counts as the value 0 (torch's
    count_include_pad), and with ``multiplier = float32(scale_in / (kernel * kernel * scale_out))``::

        code = quantize(float32(sum of (x - zero_point) over the window) * multiplier, out_precision, 1, out_zero_point)
    """
    x = np.asarray(x_codes, np.int64) - zero_point
    N, H, W, C = x.shape
    OH, OW = conv_output_size(H, kernel, stride, padding), conv_output_size(W, kernel, stride, padding)
    taps = conv_taps(H, W, kernel, kernel, stride, padding)
    flat = x.reshape(N, H * W, C)
    sums = np.where((taps >= 0)[None, :, :, None], flat[:, np.maximum(taps, 0)], 0).sum(axis=2)
    t = sums.astype(np.float32) * np.float32(multiplier)
    return quantize(t.reshape(-1, 1), out_precision, 1.0, out_zero_point).reshape(N, OH, OW, C)


def add_codes(a_codes, a_zero_point, a_multiplier, b_codes, b_zero_point, b_multiplier, out_precision,
              out_zero_point=0, relu=False):
    """A residual add of two code tensors into ``out_precision`` (multipliers: scale_in / scale_out, float32)::

        t = float32(a - za) * ma + float32(b - zb) * mb ;  t = max(t, 0) with relu ;  code = quantize(t, out, 1, zo)
    """
    ta = (np.asarray(a_codes, np.int64) - a_zero_point).astype(np.float32) * np.float32(a_multiplier)
    tb = (np.asarray(b_codes, np.int64) - b_zero_point).astype(np.float32) * np.float32(b_multiplier)
    t = ta + tb
    if relu:
        t = np.where(t > 0, t, np.float32(0))
    return quantize(t.reshape(-1, 1), out_precision, 1.0, out_zero_point).reshape(t.shape)


def flatten_weight_columns(w, channels, height, width, precision):
    """A fully connected weight over torch's flatten order (c, h, w) -> columns in apnumba's flatten
    order (h, w, c), each pixel's channels padded to a whole number of 256-bit steps.

    The padding columns meet activations whose bits are zero (the value 0: ops.flatten insists), so
    their weights drop out; they hold a valid code of ``precision`` (0, or +1 for binary)."""
    precision = Precision.parse(precision)
    w = np.asarray(w)
    out_features = w.shape[0]
    cp = padded_words(channels) * WORD_BITS
    hwc = w.reshape(out_features, channels, height, width).transpose(0, 2, 3, 1)
    padded = np.full((out_features, height, width, cp), 1 if precision.encoding is Encoding.BINARY else 0, w.dtype)
    padded[..., :channels] = hwc
    return padded.reshape(out_features, height * width * cp)


def patches(x, R, S, stride=1, padding=0):
    """im2col of NHWC values: (N*OH*OW, R*S*C), feature (r*S + s)*C + c, zero outside the image
    (what a first layer packs: reference for kernels.pack.pack_patches_kernel)."""
    x = np.asarray(x)
    N, H, W, C = x.shape
    OH, OW = conv_output_size(H, R, stride, padding), conv_output_size(W, S, stride, padding)
    xp = np.zeros((N, H + 2 * padding, W + 2 * padding, C), x.dtype)
    xp[:, padding : padding + H, padding : padding + W] = x
    cols = [xp[:, r : r + stride * (OH - 1) + 1 : stride, s : s + stride * (OW - 1) + 1 : stride] for r in range(R) for s in range(S)]
    return np.stack(cols, axis=3).reshape(N * OH * OW, R * S * C)
