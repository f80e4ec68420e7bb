"""CPU: precisions, encodings and the quantizer's edge cases."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from apnumba.precision import Encoding, Precision, dequantize, parse_wa, quantize
from apnumba.reference import bit_planes, decode, encode, from_planes

ALL = [Precision(1, "binary")] + [Precision(b, e) for b in range(1, 9) for e in ("unsigned", "signed")]


def test_ranges_and_plane_weights():
    assert (Precision(3, "unsigned").lo, Precision(3, "unsigned").hi) == (0, 7)
    assert (Precision(3, "signed").lo, Precision(3, "signed").hi) == (-4, 3)
    assert (Precision(1, "signed").lo, Precision(1, "signed").hi) == (-1, 0)
    assert (Precision(1, "binary").lo, Precision(1, "binary").hi) == (-1, 1)
    assert Precision(4, "signed").coef == (1, 2, 4, -8)
    assert Precision(4, "unsigned").coef == (1, 2, 4, 8)
    assert Precision(1, "binary").coef == (2,) and Precision(1, "binary").offset == -1


@pytest.mark.parametrize("p", ALL, ids=str)
def test_every_code_survives_planes(p):
    codes = np.array([-1, 1]) if p.encoding is Encoding.BINARY else np.arange(p.lo, p.hi + 1)
    planes = bit_planes(codes, p)
    assert planes.shape == (p.bits, codes.size)
    assert (from_planes(planes, p) == codes).all()
    assert (decode(encode(codes, p), p) == codes).all()
    # value = sum coef_j * plane_j + offset, written out by hand
    assert (sum(c * planes[j].astype(int) for j, c in enumerate(p.coef)) + p.offset == codes).all()


def test_bad_precisions_say_what_is_wrong():
    with pytest.raises(ValueError, match="bits: expected an integer in 1..8, got 9"):
        Precision(9)
    with pytest.raises(ValueError, match="bits: expected an integer in 1..8, got 0"):
        Precision(0, "signed")
    with pytest.raises(ValueError, match="binary .* exactly 1 bit, got 2"):
        Precision(2, "binary")
    with pytest.raises(ValueError, match="encoding: expected one of"):
        Precision(2, "ternary")
    with pytest.raises(TypeError, match="bits"):
        Precision(2.5)
    with pytest.raises(ValueError, match="precision: expected"):
        Precision.parse("x4")


def test_parse_shorthands():
    assert Precision.parse("u2") == Precision(2, "unsigned")
    assert Precision.parse("s8") == Precision(8, "signed")
    assert Precision.parse("b1") == Precision(1, "binary")
    assert parse_wa("w1a2") == (Precision(1, "binary"), Precision(2, "unsigned"))
    assert parse_wa("w2a2") == (Precision(2, "signed"), Precision(2, "unsigned"))
    assert parse_wa("wu3as4") == (Precision(3, "unsigned"), Precision(4, "signed"))
    with pytest.raises(ValueError, match="w<bits>a<bits>"):
        parse_wa("w1")


def test_quantizer_ties_round_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5], np.float32)
    assert quantize(x, "s4").tolist() == [0, 2, 2, 0, -2, -2, 4]


def test_quantizer_saturates_including_infinities():
    x = np.array([1e30, -1e30, np.inf, -np.inf, 7.49, 7.5, -8.5], np.float32)
    assert quantize(x, "s4").tolist() == [7, -8, 7, -8, 7, 7, -8]
    assert quantize(x, "u3").tolist() == [7, 0, 7, 0, 7, 7, 0]


def test_quantizer_negative_zero_and_nan_quantize_like_zero():
    x = np.array([-0.0, 0.0, np.nan], np.float32)
    assert quantize(x, "s3").tolist() == [0, 0, 0]
    assert quantize(x, "u2", zero_point=2).tolist() == [2, 2, 2]
    assert quantize(x, "b1").tolist() == [1, 1, 1]
    assert quantize(np.array([-1e-30], np.float32), "b1").tolist() == [-1]


def test_quantizer_uses_float32_division():
    # 0.3 / 0.1 is 2.9999999999999996 in float64 but 3.0 in float32; the quantizer divides in float32.
    assert quantize(np.array([0.3], np.float32), "u3", scale=np.float32(0.1)).tolist() == [3]


def test_quantizer_per_row_scale_and_zero_point():
    x = np.array([[1.0, 2.0, -1.0], [1.0, 2.0, -1.0]], np.float32)
    q = quantize(x, "u3", scale=[1.0, 0.5], zero_point=3)
    assert q.tolist() == [[4, 5, 2], [5, 7, 1]]
    assert np.allclose(dequantize(q, "u3", [1.0, 0.5], 3), [[1, 2, -1], [1, 2, -1]])


def test_quantizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="zero_point: only unsigned"):
        quantize(np.zeros(3, np.float32), "s3", zero_point=1)
    with pytest.raises(ValueError, match="zero_point: expected 0..3"):
        quantize(np.zeros(3, np.float32), "u2", zero_point=4)
    with pytest.raises(ValueError, match="scale: expected positive finite"):
        quantize(np.zeros(3, np.float32), "u2", scale=0.0)
    with pytest.raises(ValueError, match=r"scale: expected a scalar or one value per row \(2\)"):
        quantize(np.zeros((2, 3), np.float32), "u2", scale=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="x: expected a float array"):
        quantize(np.zeros(3, np.int32), "u2")


def test_code_checks_name_the_offender():
    with pytest.raises(ValueError, match=r"w: precision s2 holds -2..1, got 2 at index \(1,\)"):
        Precision.parse("s2").check_codes(np.array([0, 2]), "w")
    with pytest.raises(ValueError, match=r"holds -1 or \+1, got 0"):
        Precision.parse("b1").check_codes(np.array([0]), "x")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=50),
    st.sampled_from(ALL),
    st.floats(min_value=2.0**-10, max_value=1024.0, width=32),
)
def test_quantizer_output_is_always_a_valid_code(values, p, scale):
    x = np.array(values, np.float32)
    q = quantize(x, p, scale)
    assert p.contains(q).all()
    finite = np.isfinite(x)
    if p.encoding is not Encoding.BINARY:
        # Within range, the code is the float32 quotient rounded to nearest (half to even).
        ref = np.clip(np.rint(x[finite] / np.float32(scale)), p.lo, p.hi)
        assert (q[finite] == ref).all()
