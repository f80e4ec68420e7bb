"""CPU: the packed layout and the emulated product against plain integer arithmetic."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from apnumba import reference as R
from apnumba.device import AccumulatorOverflowError, check_accumulator, product_bound
from apnumba.precision import Precision

ALL = [Precision(1, "binary")] + [Precision(b, e) for b in range(1, 9) for e in ("unsigned", "signed")]


def test_layout_bit_positions_by_hand():
    """bit i of words[j, r, w] is bit j of code (r, 32 w + i); rows padded to 8 words with zeros."""
    codes = np.zeros((2, 40), np.int32)
    codes[0, 0] = 1  # plane 0, word 0, bit 0
    codes[0, 33] = 2  # plane 1, word 1, bit 1
    codes[1, 39] = 3  # planes 0 and 1, word 1, bit 7
    words = R.pack(codes, "u2")
    assert words.shape == (2, 2, 8) and words.dtype == np.uint32
    expect = np.zeros((2, 2, 8), np.uint32)
    expect[0, 0, 0] = 1
    expect[1, 0, 1] = 1 << 1
    expect[0, 1, 1] = expect[1, 1, 1] = 1 << 7
    assert (words == expect).all()


def test_signed_and_binary_planes_by_hand():
    w = R.pack(np.array([[-1, -4, 3]]), "s3")  # two's complement 111, 100, 011
    assert [int(w[j, 0, 0]) for j in range(3)] == [0b101, 0b101, 0b011]
    b = R.pack(np.array([[1, -1, 1, 1]]), "b1")  # bit = (v + 1) / 2
    assert int(b[0, 0, 0]) == 0b1101


def test_padded_words():
    assert [R.padded_words(k) for k in (1, 256, 257, 1000)] == [8, 8, 16, 32]
    with pytest.raises(ValueError, match="K: expected at least 1"):
        R.padded_words(0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 600), st.sampled_from(ALL), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(rows, K, p, seed):
    codes = R.random_codes(np.random.default_rng(seed), (rows, K), p)
    words = R.pack(codes, p)
    assert words.shape == (p.bits, rows, R.padded_words(K))
    assert (R.unpack(words, p, K) == codes).all()
    # padding bits are zero in every plane
    tail = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[:, :, K:]
    assert not tail.any()


def test_byte_layout_by_hand():
    """byte i of words[0, r, w] is the value of (r, 4 w + i) as int8 / uint8; rows padded to 32 bytes."""
    words = R.pack(np.array([[-1, 2, -128, 127, 5]]), "s8", "bytes")
    assert words.shape == (1, 1, 8) and int(words[0, 0, 0]) == 0x7F80_02FF and int(words[0, 0, 1]) == 5
    assert not words[0, 0, 2:].any()
    assert int(R.pack(np.array([[255, 1]]), "u8", "bytes")[0, 0, 0]) == 0x01FF
    assert int(R.pack(np.array([[1, -1]]), "b1", "bytes")[0, 0, 0]) == 0xFF01
    assert [R.padded_words(k, "bytes") for k in (1, 32, 33, 147)] == [8, 8, 16, 40]
    with pytest.raises(ValueError, match="packing: expected one of"):
        R.padded_words(3, "nibbles")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 300), st.sampled_from(ALL), st.integers(0, 2**32 - 1))
def test_byte_pack_round_trip_and_product(rows, K, p, seed):
    """Bytes hold the values: unpack gives the codes back, and the byte product with the byte
    correction terms (dw = dx = 0) is the integer product, zero points included."""
    rng = np.random.default_rng(seed)
    codes = R.random_codes(rng, (rows, K), p)
    words = R.pack(codes, p, "bytes")
    assert words.shape == (1, rows, R.padded_words(K, "bytes"))
    assert (R.unpack(words, p, K, "bytes") == codes).all()
    assert not words.view(np.uint8).reshape(rows, -1)[:, K:].any()
    x = R.random_codes(rng, (5, K), Precision(3))
    zw = 1 if p.encoding.value == "unsigned" else 0
    c_sw, c_sx, c_const = R.correction_terms(p, "u3", K, zw, 2, "bytes")
    y = codes.astype(np.int64) @ x.T.astype(np.int64) + c_sw * R.row_sums(codes)[:, None] + c_sx * R.row_sums(x) + c_const
    assert (y == R.matmul_int(codes, x, zw, 2)).all()


def test_bytes_pay_counts_products():
    assert R.bytes_pay("s8", "s8", 27) and R.bytes_pay("s8", "u8", 4096)  # 64 plane pairs
    assert not R.bytes_pay("b1", "u2", 4096)  # 2 b1 mma per 256 k against 8 int8
    assert R.bytes_pay("b1", "u2", 27)  # one 256-bit step for 27 features: 2 mma against 1
    assert R.mma_kind("s8", "u8", "bytes") == "s8.u8" and R.mma_kind("b1", "u2", "bytes") == "s8.u8"
    assert R.mma_kind("s8", "u8") == "b1"


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 20), st.integers(1, 20), st.integers(1, 700),
    st.sampled_from(ALL), st.sampled_from(ALL), st.integers(0, 2**32 - 1),
)
def test_emulated_product_equals_integer_product(M, N, K, pw, px, seed):
    rng = np.random.default_rng(seed)
    w = R.random_codes(rng, (M, K), pw)
    x = R.random_codes(rng, (N, K), px)
    assert (R.apmm(w, x, pw, px) == R.matmul_int(w, x)).all()


@pytest.mark.parametrize("pw", ALL, ids=str)
@pytest.mark.parametrize("px", ALL, ids=str)
def test_every_encoding_pair_at_extreme_values(pw, px):
    """All-max and all-min operands: the largest magnitudes each correction term sees."""
    K = 300
    for wv in (pw.lo, pw.hi):
        for xv in (px.lo, px.hi):
            w = np.full((3, K), wv)
            x = np.full((2, K), xv)
            assert (R.apmm(w, x, pw, px) == K * wv * xv).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_zero_points(bw, bx, K, seed):
    rng = np.random.default_rng(seed)
    pw, px = Precision(bw, "unsigned"), Precision(bx, "unsigned")
    zw, zx = int(rng.integers(0, 2**bw)), int(rng.integers(0, 2**bx))
    w = R.random_codes(rng, (4, K), pw)
    x = R.random_codes(rng, (5, K), px)
    assert (R.apmm(w, x, pw, px, zw, zx) == R.matmul_int(w, x, zw, zx)).all()


def test_reference_checks_its_input():
    with pytest.raises(ValueError, match="same K"):
        R.apmm(np.zeros((2, 3), int), np.zeros((2, 4), int), "u1", "u1")
    with pytest.raises(ValueError, match="x: precision u1 holds 0..1, got 2"):
        R.apmm(np.zeros((2, 3), int), np.full((2, 3), 2), "u1", "u1")
    with pytest.raises(ValueError, match=r"words: expected shape \(2, rows, 8\)"):
        R.unpack(np.zeros((1, 2, 8), np.uint32), "u2", 10)


def test_accumulator_overflow_is_refused_before_launch():
    check_accumulator(33025, "u8", "u8")  # 33025 * 255 * 255 < 2^31
    with pytest.raises(AccumulatorOverflowError, match="K must be at most 33025"):
        check_accumulator(33026, "u8", "u8")
    assert product_bound(100, "s8", "s8") == 100 * 128 * 128
    assert product_bound(10, "u2", "u2", 0, 3) == 10 * 3 * 3
    # binary x binary never overflows for any sensible K
    check_accumulator(2**30, "b1", "b1")


# ---------------------------------------------------------------- convolution


@settings(max_examples=120, deadline=None)
@given(
    st.sampled_from(ALL), st.sampled_from(ALL),
    st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 5, 32, 70, 128, 129, 300]),
    st.integers(1, 5), st.sampled_from([1, 3, 5]), st.sampled_from([1, 2, 4]), st.integers(0, 2), st.integers(0, 2**32 - 1),
)
def test_conv_algebra_equals_integer_convolution(px, pw, N, H, W, C, K, k, stride, padding, seed):
    """Gathered planes + border corrections (what the kernel does) == plain convolution of the values."""
    if H + 2 * padding < k or W + 2 * padding < k:
        return
    rng = np.random.default_rng(seed)
    x = R.random_codes(rng, (N, H, W, C), px)
    w = R.random_codes(rng, (K, k, k, C), pw)
    zx = int(rng.integers(0, px.hi + 1)) if px.encoding.value == "unsigned" else 0
    zw = int(rng.integers(0, pw.hi + 1)) if pw.encoding.value == "unsigned" else 0
    assert (R.conv2d(x, w, px, pw, stride, padding, zx, zw) == R.conv2d_int(x, w, stride, padding, zx, zw)).all()


def test_conv_zero_padding_is_the_value_zero_for_binary_activations():
    """+-1 activations: a tap outside the image adds 0, not -1 (torch's padding on the dequantized values)."""
    x = np.ones((1, 1, 1, 1), int)  # one pixel of value +1
    w = np.ones((1, 3, 3, 1), int)
    assert R.conv2d(x, w, "b1", "b1", 1, 1).item() == 1
    assert R.conv2d(-x, w, "b1", "b1", 1, 1).item() == -1


def test_conv_weight_layout():
    """At most 128 channels: 4 words a tap (two taps share a 256-bit k-step), the row padded to whole
    k-steps; more: each tap's channels padded to whole k-steps."""
    w = np.zeros((2, 3, 3, 40), int)
    w[1, 2, 1, 33] = 1  # tap (2, 1) = 7, channel 33 -> word 7 * 4 + 1, bit 1
    words, rowsum, taps = R.pack_conv_weight(w, "u1")
    assert words.shape == (1, 2, 40)  # 9 taps x 4 words = 36, padded to 40
    assert words[0, 1, 7 * 4 + 1] == 1 << 1 and words.sum() == 1 << 1
    assert rowsum.tolist() == [0, 1] and taps[1, 7] == 1 and taps.sum() == 1
    w = np.zeros((1, 3, 3, 140), int)
    w[0, 2, 1, 130] = 1  # tap 7, channel 130 -> word 7 * 8 + 4, bit 2
    words, _, _ = R.pack_conv_weight(w, "u1")
    assert words.shape == (1, 1, 72) and words[0, 0, 7 * 8 + 4] == 1 << 2 and words.sum() == 1 << 2
    assert R.conv_tap_words(128) == 4 and R.conv_tap_words(129) == 8 and R.conv_tap_words(100, "bytes") == 32
    words, _, _ = R.pack_conv_weight(np.ones((1, 3, 3, 100), int), "s8", "bytes")
    assert words.shape == (1, 1, 9 * 32)  # bytes: whole k-steps a tap


def test_conv_shapes_are_checked():
    with pytest.raises(ValueError, match="gives no output"):
        R.conv_output_size(2, 5, 1, 1)
    with pytest.raises(ValueError, match="same C"):
        R.conv2d_int(np.zeros((1, 4, 4, 3)), np.zeros((2, 3, 3, 4)))


def test_max_pooled_requantize_equals_requantize_then_max_pool(rng):
    y = rng.integers(-300, 300, size=(2, 7, 6, 37)).astype(np.int32)
    scale = rng.uniform(0.001, 0.03, 37).astype(np.float32)
    bias = rng.uniform(-2, 2, 37).astype(np.float32)
    for relu in (False, True):
        for prec in ("u2", "s3", "b1"):
            fused = R.requantize_pool(y, scale, bias, prec, 0, relu, "max")
            codes = R.requantize(y.reshape(-1, 37), scale, bias, prec, 0, relu).reshape(y.shape)
            assert (fused == R.max_pool_codes(codes, 2, 2)).all()
    avg = R.requantize_pool(y, scale, bias, "u4", 0, True, "avg")
    t = np.maximum(y[:, :6].astype(np.float64) * scale + bias, 0).reshape(2, 3, 2, 3, 2, 37).mean(axis=(2, 4))
    assert np.abs(avg - np.clip(np.rint(t), 0, 15)).max() <= 1  # float32 vs float64 rounding at ties only


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["u1", "u2", "u3", "s2", "s3", "b1", "u8"]), st.booleans(), st.integers(0, 2**32 - 1))
def test_requantize_thresholds_equal_the_float_epilogue(prec, relu, seed):
    """Integer thresholds (the GPU's epilogue) give requantize's codes for every int32 sum: random ones,
    the extremes, and each threshold's two sides; scales of both signs, zero, tiny and huge."""
    rng = np.random.default_rng(seed)
    p = Precision.parse(prec)
    K = 24
    scale = rng.choice([1, -1], K) * 10.0 ** rng.uniform(-9, 3, K)
    scale[:3] = [0.0, -0.0, 3e38]
    bias = rng.normal(0, 5, K) * (rng.random(K) < 0.7)
    scale, bias = scale.astype(np.float32), bias.astype(np.float32)
    zp = int(rng.integers(0, p.hi + 1)) if p.encoding.value == "unsigned" else 0
    thr = R.requantize_thresholds(scale, bias, p, zp, relu)
    edges = thr[:, 1:].astype(np.int64) * thr[:, :1]  # each threshold in y, and its neighbours
    y = np.concatenate([rng.integers(-(2**31) + 1, 2**31, (64, K)), rng.integers(-3000, 3000, (64, K)),
                        np.full((2, K), 2**31 - 1) * np.array([[1], [-1]]), edges.T, edges.T + 1, edges.T - 1])
    y = np.clip(y, -(2**31) + 1, 2**31 - 1).astype(np.int32)
    assert (R.requantize_by_thresholds(y, thr, p) == R.requantize(y, scale, bias, p, zp, relu)).all()
    # a channel's thresholds rise, so the planes come straight from the comparisons (the GPU's bit logic)
    assert (np.diff(thr[:, 1:].astype(np.int64), axis=1) >= 0).all()
    if p.bits <= 3:
        assert (R.planes_by_thresholds(y, thr, p) == R.bit_planes(R.requantize_by_thresholds(y, thr, p), p)).all()


def test_requantize_thresholds_need_finite_constants():
    assert R.requantize_thresholds(np.float32([1, np.inf]), np.float32([0, 0]), "u2") is None
    assert R.requantize_thresholds(np.float32([1, 1]), np.float32([0, np.nan]), "u2") is None


# The convolution kernel divides by launch constants (pixels of an image, a row, the filter width, a tap's
# words) with magic numbers; the simulator runs the GPU formula itself (simwarp.divmod_magic).
def _magic_divmod(n, d):
    from apnumba.kernels.ptx import magic_divisor
    from apnumba.kernels.simwarp import divmod_magic

    q, r = divmod_magic(n, d, *magic_divisor(d))
    return int(q), int(r)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 7, 9, 49, 196, 3136, 12544, 2**16 - 1, 2**16 + 1, 2**30 - 1, 2**30,
                               2**30 + 1, 2**31 - 1])
def test_magic_division_at_the_edges(d):
    for n in {0, 1, d - 1, d, d + 1, 2 * d - 1, 2**31 - 1, (2**31 - 1) // d * d, (2**31 - 1) // d * d - 1}:
        if 0 <= n < 2**31:
            assert _magic_divmod(n, d) == divmod(n, d), (n, d)


@settings(max_examples=2000, deadline=None)
@given(st.integers(1, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_magic_division_matches_floor_division(d, n):
    assert _magic_divmod(n, d) == divmod(n, d)


def test_magic_division_numbers_fit_32_bits_and_bad_divisors_are_refused():
    from apnumba.kernels.ptx import magic_divisor

    for d in [1, 2, 3, 2**31 - 1] + [2**k + 1 for k in range(31)]:
        magic, shift = magic_divisor(d)
        assert -(2**31) <= magic < 2**31 and 0 <= shift <= 31
    assert magic_divisor(1) == (-(2**31), 0)  # 2^31, as an int32's bits
    assert magic_divisor(3) == (-(2**31) + (2**33 // 3 + 1) - 2**31, 2)
    for bad in (0, -3, 2**31):
        with pytest.raises(ValueError, match=r"magic_divisor: expected a divisor in \[1, 2\*\*31\), got"):
            magic_divisor(bad)
