"""Quantize floats and pack them into bit planes on the GPU; unpack again for tests.

Layout written (``apnumba.reference`` documents it)::

    words[plane, row, word]  uint32, shape (bits, rows, kwords), kwords a multiple of 8
    bit i of words[j, r, w] = bit j of the code of x[r, 32 w + i]; zero beyond K

``pack_rows_kernel`` - one warp per 256-bit chunk (8 words) of one row; grid
(ceil(rows / WARPS_PER_BLOCK), kwords / 8), so no thread divides::

    lane l, word w:  x[row, 32 w + l] --quantize--> code --> bit pattern
                     ballot(bit j of pattern) for each plane j  ->  words[j, row, w]  (stored by lane j)
    per warp:        sum of the chunk's codes (from the ballots' popcounts) -> one atomic add to rowsum[row]

Loads are coalesced (a warp reads 128 consecutive bytes per word) and no thread
ever writes single bits.  ``rowsum`` must be zeroed before the launch.
The quantizer arithmetic is the reference's, operation for operation
(IEEE float32 division, ``rint``, clamp), so codes match it bit for bit.
"""

import functools

from numba import cuda, float32, int32, int64, uint32

from .ptx import ballot, divmod_u32, f32_div_rn, f32_rint, popc32, shfl_idx

WARPS_PER_BLOCK = 8
CHUNK_WORDS = 8  # 256 bits: the K padding unit

ENC_UNSIGNED, ENC_SIGNED, ENC_BINARY = 0, 1, 2


@cuda.jit(device=True, inline="always")
def plane_coef(j, bits, encoding):
    """Weight of plane j (``apnumba.precision.Precision.coef``)."""
    if encoding == ENC_BINARY:
        return 2
    c = int32(1) << j
    if encoding == ENC_SIGNED and j == bits - 1:
        c = -c
    return c


@cuda.jit(device=True, inline="always")
def code_range(bits, encoding):
    """(lo, hi) of the codes of a precision."""
    if encoding == ENC_UNSIGNED:
        return 0, (int32(1) << bits) - 1
    if encoding == ENC_SIGNED:
        return -(int32(1) << (bits - 1)), (int32(1) << (bits - 1)) - 1
    return -1, 1


@cuda.jit(device=True, inline="always")
def quantize_code(t, zero_point, lo, hi, encoding):
    """float32 value already divided by its scale -> its code (the reference quantizer)."""
    if encoding == ENC_BINARY:
        return int32(1) if (t >= 0 or t != t) else int32(-1)
    t = f32_rint(t)
    if t != t:
        t = float32(0)
    t = min(max(t, float32(lo - zero_point)), float32(hi - zero_point))
    return int32(t) + zero_point


@cuda.jit(device=True, inline="always")
def encode_code(code, bits, encoding):
    """A code's bit pattern (the planes' bits)."""
    if encoding == ENC_BINARY:
        return (code + 1) >> 1
    return code & ((int32(1) << bits) - 1)


@cuda.jit(device=True, inline="always")
def quantize_scaled(t, zero_point, lo, hi, bits, encoding):
    """float32 value already divided by its scale -> the bit pattern of its code (the reference quantizer)."""
    return encode_code(quantize_code(t, zero_point, lo, hi, encoding), bits, encoding)


@cuda.jit(device=True, inline="always")
def quantize_pattern(v, s, zero_point, lo, hi, bits, encoding):
    """float32 value and scale -> the bit pattern of its code (the reference quantizer, step for step).

    (The sign of v / s is the sign of v for s > 0, so binary codes need no division.)"""
    return quantize_scaled(f32_div_rn(v, s), zero_point, lo, hi, bits, encoding)


@cuda.jit
def pack_rows_kernel(x, rows, K, ld, scale, scale_step, zero_point, bits, encoding, words, kwords, rowsum):
    """x: flat float32/float16 (rows x ld); scale: float32 per row (scale_step 1) or one value (0)."""
    lane = cuda.threadIdx.x & 31
    row = cuda.blockIdx.x * WARPS_PER_BLOCK + (cuda.threadIdx.x >> 5)
    chunk = cuda.blockIdx.y
    if row >= rows:
        return  # whole warps leave together, so the ballots below stay convergent
    s = float32(scale[row * scale_step])
    lo, hi = code_range(bits, encoding)
    offset = -1 if encoding == ENC_BINARY else 0
    total = 0
    for w in range(CHUNK_WORDS):
        word = chunk * CHUNK_WORDS + w
        k = word * 32 + lane
        # Quantize unconditionally (a clamped, valid address) and mask after: no divergence before the ballots.
        pattern = quantize_pattern(float32(x[row * ld + min(k, K - 1)]), s, zero_point, lo, hi, bits, encoding)
        pattern = pattern if k < K else int32(0)
        for j in range(bits):
            plane_word = ballot((pattern >> j) & 1)
            if lane == j:
                words[(j * rows + row) * kwords + word] = plane_word
            total += plane_coef(j, bits, encoding) * popc32(plane_word)
        total += offset * popc32(ballot(k < K))
    if lane == 0:
        cuda.atomic.add(rowsum, row, total)


@cuda.jit
def unpack_rows_kernel(words, rows, K, kwords, bits, encoding, codes):
    """codes[row * K + k] = the value whose planes are stored at (row, k); grid (rows, ceil(K / threads)).

    Rows go on the grid's x (up to 2^31 - 1 blocks): a 224x224 image batch has more pixel rows than the
    65,535 blocks a grid's y allows."""
    row = cuda.blockIdx.x
    k = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if k >= K:
        return
    word = k >> 5
    bit = k & 31
    v = int32(0)
    for j in range(bits):
        b = (words[(j * rows + row) * kwords + word] >> bit) & 1
        v += plane_coef(j, bits, encoding) * int32(b)
    if encoding == ENC_BINARY:
        v -= 1
    codes[row * K + k] = v


@functools.lru_cache(maxsize=None)
def pack_patches_kernel(bits, encoding):
    """The first-layer packer for one precision (``bits`` and ``encoding`` are compile-time constants:
    the plane loop unrolls and each plane's weight folds - the kernel is instruction bound)."""

    @cuda.jit
    def kernel(x, geometry, strides, scale, zero_point, words, kwords, rowsum):
        """A network's first layer: quantize float images and pack each output pixel's receptive field.

        Row = output pixel (n, oh, ow); k = (r * S + s) * C + c, densely (a 3-channel 7x7 stem has 147
        features: one 256-bit step, not 49 padded taps); taps outside the image are the value 0.  The
        layer then runs as a 1x1 convolution over these rows.  One warp per row, one word per lane-sweep:
        lane l quantizes feature 32 w + l, one ballot per plane packs it, lane j keeps plane j's word and
        stores it (one store per lane); the warp writes the row sum.

        geometry: [N, H, W, C, R, S, stride, padding, OH, OW]; strides: element strides of x's (n, h, w, c)
        (NCHW or NHWC float32/float16 input alike).  scale: one float32.
        """
        lane = cuda.threadIdx.x & 31
        row = cuda.blockIdx.x * WARPS_PER_BLOCK + (cuda.threadIdx.x >> 5)
        N, H, W, C = geometry[0], geometry[1], geometry[2], geometry[3]
        R, S, stride, pad, OH, OW = geometry[4], geometry[5], geometry[6], geometry[7], geometry[8], geometry[9]
        if row >= N * OH * OW:
            return  # whole warps leave together
        img, rest = divmod_u32(row, OH * OW)
        oh, ow = divmod_u32(rest, OW)
        features = R * S * C
        lo, hi = code_range(bits, encoding)
        s = float32(scale[0])
        total = int32(0)
        plane_stride = N * OH * OW * kwords
        for word in range((features + 31) // 32):  # the padding words past the features stay zero from allocation
            k = word * 32 + lane
            tap, c = divmod_u32(min(k, features - 1), C)
            r, t = divmod_u32(tap, S)
            ih = oh * stride - pad + r
            iw = ow * stride - pad + t
            inside = ih >= 0 and ih < H and iw >= 0 and iw < W
            at = (img * strides[0] + min(max(ih, 0), H - 1) * strides[1] + min(max(iw, 0), W - 1) * strides[2]
                  + c * strides[3])
            v = float32(x[at]) if inside else float32(0)
            pattern = quantize_pattern(v, s, zero_point, lo, hi, bits, encoding)
            pattern = pattern if k < features else int32(0)
            mine = uint32(0)
            for j in range(bits):
                plane_word = ballot((pattern >> j) & 1)
                mine = plane_word if lane == j else mine
                total += plane_coef(j, bits, encoding) * popc32(plane_word)
            if lane < bits:
                words[lane * plane_stride + row * kwords + word] = mine
            if encoding == ENC_BINARY:
                total -= popc32(ballot(k < features))
        if lane == 0:
            rowsum[row] = total

    return kernel


def byte_segment(words):
    """Lanes per row of the byte packers for rows of ``words`` words: the next power of two, at most 32
    (a 27-feature row of 7 words shares its warp with 3 other rows)."""
    segment = 1
    while segment < min(words, 32):
        segment *= 2
    return segment


@functools.lru_cache(maxsize=None)
def lane_group_sum(segment):
    """A device function (total, lane) -> the sum over the aligned group of ``segment`` lanes (a power of
    two <= 32) that ``lane`` is in, in every lane of the group; every lane of the warp must call it."""

    @cuda.jit(device=True, inline="always")
    def segment_sum(total, lane):
        """Butterfly over the ``segment`` lanes of a row: every one of them ends with the row's sum."""
        shift = segment // 2
        while shift > 0:
            total += shfl_idx(total, lane ^ shift)
            shift //= 2
        return total

    return segment_sum


warp_sum = lane_group_sum(32)  # (total, lane) -> the sum over the warp, in every lane


@functools.lru_cache(maxsize=None)
def pack_rows_bytes_kernel(bits, encoding, segment):
    """Quantize float rows (rows x K, row stride ld) into byte-packed rows (``reference``: byte packing):
    a code is one byte, so no ballots - a lane quantizes 4 features and stores their word.

    ``segment`` (a power of two <= 32) lanes share one row, 32 / segment rows a warp; lane j of a
    segment takes words j, j + segment, ...; the segment adds the codes by shuffles into ``rowsum``.
    scale: float32 per row (scale_step 1) or one (0).  Launch: grid ceil(rows / (WARPS_PER_BLOCK *
    32 / segment)), block 32 * WARPS_PER_BLOCK.
    """
    ROWS_PER_WARP = 32 // segment
    segment_sum = lane_group_sum(segment)

    @cuda.jit
    def kernel(x, rows, K, ld, scale, scale_step, zero_point, words, kwords, rowsum):
        lane = cuda.threadIdx.x & 31
        row = (cuda.blockIdx.x * WARPS_PER_BLOCK + (cuda.threadIdx.x >> 5)) * ROWS_PER_WARP + lane // segment
        live = row < rows
        row = min(row, rows - 1)  # dead lanes redo the last row and store nothing: the shuffles stay whole
        lo, hi = code_range(bits, encoding)
        s = float32(scale[row * scale_step])
        total = int32(0)
        for word in range(lane % segment, (K + 3) // 4, segment):  # padding words stay zero from allocation
            packed = uint32(0)
            for b in range(4):
                k = word * 4 + b
                v = float32(x[row * ld + min(k, K - 1)])
                code = quantize_code(f32_div_rn(v, s), zero_point, lo, hi, encoding) if k < K else int32(0)
                packed |= uint32(code & 0xFF) << (8 * b)
                total += code
            if live:
                words[row * kwords + word] = packed
        total = segment_sum(total, lane)
        if live and lane % segment == 0:
            rowsum[row] = total

    return kernel


@functools.lru_cache(maxsize=None)
def quantize_pixels_bytes_kernel(bits, encoding):
    """A byte-packed first layer's input, read by the convolution directly: float images -> each
    pixel's C codes as bytes, ``kwords`` words a pixel (1 for an image of <= 4 channels), and the
    pixel's code sum.  One thread per pixel (consecutive threads, consecutive pixels: the reads
    coalesce in NCHW and NHWC alike), so each value is quantized once.  geometry: [N, H, W, C];
    strides: the input's, by (n, h, w, c); the words past C stay as allocated (zero)."""

    @cuda.jit
    def kernel(x, geometry, strides, scale, zero_point, words, kwords, rowsum):
        pixel = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        N, H, W, C = geometry[0], geometry[1], geometry[2], geometry[3]
        if pixel >= N * H * W:
            return
        img, hw = divmod_u32(pixel, H * W)
        h, w = divmod_u32(hw, W)
        at = int64(img) * strides[0] + int64(h) * strides[1] + int64(w) * strides[2]
        s = float32(scale[0])
        lo, hi = code_range(bits, encoding)
        total = int32(0)
        for word in range((C + 3) // 4):
            packed = uint32(0)
            for b in range(4):
                c = 4 * word + b
                if c < C:
                    code = quantize_code(f32_div_rn(float32(x[at + c * strides[3]]), s), zero_point, lo, hi, encoding)
                    packed |= uint32(code & 0xFF) << (8 * b)
                    total += code
            words[int64(pixel) * kwords + word] = packed
        rowsum[pixel] = total

    return kernel
