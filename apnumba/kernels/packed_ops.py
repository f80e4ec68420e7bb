"""Operations on packed tensors where fusion into a product's epilogue is not possible.

Pooling, residual add, and the per-image row sums a flatten needs.  One warp per output row
(pixel) - for pooling, per output row and 32-channel word, so a global pooling of few pixels and
many taps still fills the GPU; lane l takes channel 32 w + l of word w: its code is read straight
off the bit planes, combined, quantized, and packed again by one ballot per plane.  A warp of a
whole row writes the row's code sum itself; pooling warps add theirs to a zeroed sum (one atomic
each).  Words past the channels are left alone: packed buffers are allocated zeroed and nothing
writes their padding.

Max pooling keeps the precision, so it needs no codes at all: :func:`max_pool_kernel` takes the
maximum of whole 32-channel words at once, plane by plane from the top (one thread per output
word instead of a warp).
"""

import functools

from numba import cuda, float32, int32, uint32, uint64

from .pack import ENC_BINARY, ENC_SIGNED, code_range, plane_coef, quantize_scaled
from .ptx import ballot, divmod_u32, f32_add_rn, f32_mul_rn, popc32

WARPS_PER_BLOCK = 8


@cuda.jit(device=True, inline="always")
def lane_code(planes, col, bits, encoding, lane):
    """The code of bit ``lane`` of plane words already loaded: planes[j, col] for plane j."""
    v = int32(0)
    for j in range(bits):
        v += plane_coef(j, bits, encoding) * int32((planes[j, col] >> lane) & 1)
    return v - 1 if encoding == ENC_BINARY else v


@cuda.jit(device=True, inline="always")
def code_at(words, rows, cwords, bits, encoding, row, word, lane):
    """The code of channel 32 * word + lane of ``row`` in packed words (bits, rows, cwords)."""
    at, plane_words = row * cwords + word, rows * cwords
    v = int32(0)
    for j in range(bits):
        v += plane_coef(j, bits, encoding) * int32((words[uint64(at) + uint64(j) * uint64(plane_words)] >> lane) & 1)
    return v - 1 if encoding == ENC_BINARY else v


@cuda.jit(device=True, inline="always")
def store_word_at(out, at, plane_words, bits, encoding, lane, pattern, valid):
    """Ballot each plane of the lanes' patterns into word ``at`` of plane 0 (plane j's is ``plane_words``
    further on); return the word's code sum."""
    total = int32(0)
    for j in range(bits):
        plane_word = ballot((pattern >> j) & 1)
        if lane == j:
            out[uint64(at) + uint64(j) * uint64(plane_words)] = plane_word  # (unsigned: no wraparound test)
        total += plane_coef(j, bits, encoding) * popc32(plane_word)
    if encoding == ENC_BINARY:
        total -= popc32(ballot(valid))
    return total


@cuda.jit(device=True, inline="always")
def store_word(out, rows, cwords, bits, encoding, row, word, lane, pattern, valid):
    """Ballot each plane of the lanes' patterns into word ``word`` of ``row``; return the word's code sum."""
    return store_word_at(out, row * cwords + word, rows * cwords, bits, encoding, lane, pattern, valid)


@cuda.jit(device=True, inline="always")
def requantize_word(t, relu, zero_point, lo, hi, bits, encoding, out, rows, cwords, row, word, lane, valid):
    """ReLU (relu != 0), then quantize each lane's value ``t`` (already divided by the output scale) and pack
    the codes into word ``word`` of ``row``; return the word's code sum."""
    if relu != 0 and not t > 0:
        t = float32(0)
    pattern = quantize_scaled(t, zero_point, lo, hi, bits, encoding)
    return store_word(out, rows, cwords, bits, encoding, row, word, lane, pattern if valid else 0, valid)


@functools.lru_cache(maxsize=None)
def avg_pool_kernel(bits, enc, out_bits, out_enc, kernel_size):
    """Average pooling for one (input precision, output precision, window): compile-time constants, so
    the plane and tap loops unroll, the planes' weights fold, and every tap's loads are issued before the
    first is used (a clamped address, masked after: no branch around a load).  (Max pooling is bit-sliced:
    :func:`max_pool_kernel`.)"""

    @cuda.jit
    def kernel(x, geometry, params, multiplier, out, out_rowsum):
        """geometry: [N, H, W, C, kernel, stride, padding, OH, OW, cwords]; params: [zero_point, out_zero_point].
        One warp per (output row, channel word): N * OH * OW * ceil(C / 32) warps; out_rowsum zeroed first."""
        lane = cuda.threadIdx.x & 31
        N, H, W, C = geometry[0], geometry[1], geometry[2], geometry[3]
        stride, pad, OH, OW, cwords = geometry[5], geometry[6], geometry[7], geometry[8], geometry[9]
        k = kernel_size
        row, word = divmod_u32(cuda.blockIdx.x * WARPS_PER_BLOCK + (cuda.threadIdx.x >> 5), (C + 31) // 32)
        if row >= N * OH * OW:
            return  # whole warps leave together
        zp, out_zp = params[0], params[1]
        lo, hi = code_range(out_bits, out_enc)
        img, rest = divmod_u32(row, OH * OW)
        oh, ow = divmod_u32(rest, OW)
        rows_in = N * H * W
        valid = 32 * word + lane < C
        acc = int32(0)
        for r in range(k):
            for s in range(k):
                ih = oh * stride - pad + r
                iw = ow * stride - pad + s
                inside = ih >= 0 and ih < H and iw >= 0 and iw < W
                at = (img * H + min(max(ih, 0), H - 1)) * W + min(max(iw, 0), W - 1)
                code = code_at(x, rows_in, cwords, bits, enc, at, word, lane)
                acc += code - zp if inside else 0
        pattern = quantize_scaled(f32_mul_rn(float32(acc), multiplier), out_zp, lo, hi, out_bits, out_enc)
        total = store_word(out, N * OH * OW, cwords, out_bits, out_enc, row, word, lane, pattern if valid else 0,
                           valid)
        if lane == 0:
            cuda.atomic.add(out_rowsum, row, total)

    return kernel


@functools.lru_cache(maxsize=None)
def max_pool_kernel(bits, enc, kernel_size):
    """Max pooling of packed codes, bit-sliced: one thread per (output pixel, 32-channel word), the
    maximum of the window's words found plane by plane from the top, 32 channels at once::

        alive[t] = all ones for each tap t inside the image (per channel: "may still be the max")
        for plane j from the top:  out_j = OR_t (alive[t] & x_t,j);  alive[t] &= x_t,j | ~out_j

    (a channel's taps with a 0 where another alive tap has a 1 drop out).  Unsigned codes order as
    their bit patterns, +-1 codes too (bit 1 = +1); two's complement ones once the top plane is
    inverted.  The code sum of the word is added to the zeroed row sum (one atomic per thread)."""
    TAPS = kernel_size * kernel_size
    FLIP = uint32(0xFFFFFFFF) if enc == ENC_SIGNED else uint32(0)  # applied to the top plane

    @cuda.jit
    def kernel(x, geometry, out, out_rowsum):
        """geometry: [N, H, W, C, kernel, stride, padding, OH, OW, cwords]: N * OH * OW * ceil(C / 32) threads."""
        N, H, W, C = geometry[0], geometry[1], geometry[2], geometry[3]
        stride, pad, OH, OW, cwords = geometry[5], geometry[6], geometry[7], geometry[8], geometry[9]
        words_c = (C + 31) >> 5
        row, word = divmod_u32(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, words_c)
        rows_out = int32(N * OH * OW)
        if row >= rows_out:
            return
        img, rest = divmod_u32(row, OH * OW)
        oh, ow = divmod_u32(rest, OW)
        plane_in = uint64(N * H * W) * uint64(cwords)
        plane_out = uint64(rows_out) * uint64(cwords)
        tail = C - 32 * int32(word)
        valid = uint32(0xFFFFFFFF) if tail >= 32 else (uint32(1) << uint32(tail)) - uint32(1)
        alive = cuda.local.array(TAPS, uint32)
        taps = cuda.local.array((bits, TAPS), uint32)
        for r in range(kernel_size):  # every tap's words loaded first (clamped addresses, masked after)
            for s in range(kernel_size):
                ih = int32(oh * stride - pad + r)
                iw = int32(ow * stride - pad + s)
                inside = ih >= 0 and ih < H and iw >= 0 and iw < W
                at = uint64(int32((img * H + min(max(ih, 0), H - 1)) * W + min(max(iw, 0), W - 1))) * uint64(cwords) + word
                alive[r * kernel_size + s] = uint32(0xFFFFFFFF) if inside else uint32(0)
                for j in range(bits):
                    taps[j, r * kernel_size + s] = x[at + uint64(j) * plane_in]
        total = int32(0)
        for jj in range(bits):
            j = bits - 1 - jj  # top plane first
            flip = FLIP if j == bits - 1 else uint32(0)
            best = uint32(0)
            for t in range(TAPS):
                best |= alive[t] & (taps[j, t] ^ flip)
            if j > 0:
                for t in range(TAPS):
                    alive[t] &= (taps[j, t] ^ flip) | ~best
            best = (best ^ flip) & valid
            out[uint64(row) * uint64(cwords) + word + uint64(j) * plane_out] = best
            total += plane_coef(j, bits, enc) * popc32(best)
        if enc == ENC_BINARY:
            total -= popc32(valid)
        cuda.atomic.add(out_rowsum, row, total)

    return kernel


@cuda.jit
def add_kernel(a, b, rows, C, cwords, params, a_mult, b_mult, out, out_rowsum):
    """params: [a_bits, a_enc, a_zp, b_bits, b_enc, b_zp, out_bits, out_enc, out_zp, relu]."""
    lane = cuda.threadIdx.x & 31
    row = cuda.blockIdx.x * WARPS_PER_BLOCK + (cuda.threadIdx.x >> 5)
    if row >= rows:
        return
    out_bits, out_enc, out_zp, relu = params[6], params[7], params[8], params[9]
    lo, hi = code_range(out_bits, out_enc)
    total = int32(0)
    for word in range((C + 31) // 32):
        valid = 32 * word + lane < C
        ca = code_at(a, rows, cwords, params[0], params[1], row, word, lane) - params[2]
        cb = code_at(b, rows, cwords, params[3], params[4], row, word, lane) - params[5]
        t = f32_add_rn(f32_mul_rn(float32(ca), a_mult), f32_mul_rn(float32(cb), b_mult))
        total += requantize_word(t, relu, out_zp, lo, hi, out_bits, out_enc, out, rows, cwords, row, word, lane, valid)
    if lane == 0:
        out_rowsum[row] = total


@cuda.jit
def requantize_kernel(y, rows, C, cwords, scale, bias, params, out, out_rowsum):
    """int32 sums (rows x C, channel-contiguous) -> the next layer's packed codes, one warp per row:
    reference.requantize without a residual.  params: [out_bits, out_enc, out_zp, relu].  The
    unfused path: what the fused epilogue saves (bench.py conv compares the two)."""
    lane = cuda.threadIdx.x & 31
    row = cuda.blockIdx.x * WARPS_PER_BLOCK + (cuda.threadIdx.x >> 5)
    if row >= rows:
        return
    out_bits, out_enc, out_zp, relu = params[0], params[1], params[2], params[3]
    lo, hi = code_range(out_bits, out_enc)
    total = int32(0)
    for word in range((C + 31) // 32):
        c = 32 * word + lane
        valid = c < C
        cc = min(c, C - 1)
        t = f32_add_rn(f32_mul_rn(float32(y[row * C + cc]), scale[cc]), bias[cc])
        total += requantize_word(t, relu, out_zp, lo, hi, out_bits, out_enc, out, rows, cwords, row, word, lane, valid)
    if lane == 0:
        out_rowsum[row] = total


@cuda.jit
def image_rowsum_kernel(rowsum, pixels, images, out):
    """out[i] = the sum of image i's pixel row sums (a flatten's row sums)."""
    i = cuda.grid(1)
    if i < images:
        total = int32(0)
        for p in range(pixels):
            total += rowsum[i * pixels + p]
        out[i] = total
