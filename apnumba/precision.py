"""Precisions (bits + encoding) and the quantizer that maps floats to their integer codes.

A tensor of ``b`` bits (1..8) holds integers in one of three encodings.  Each value
is a weighted sum of its bit planes plus an offset, ``v = sum_j coef[j] * bit_j + offset``:

============  ==============================  =====================================  ======
encoding      values                          coef[j]                                offset
============  ==============================  =====================================  ======
``unsigned``  0 .. 2^b - 1                    2^j                                    0
``signed``    -2^(b-1) .. 2^(b-1) - 1         2^j, but the top plane -2^(b-1)        0
              (two's complement)
``binary``    -1, +1 (b = 1 only)             2                                      -1
============  ==============================  =====================================  ======

Every kernel and the reference work from ``coef`` and ``offset`` alone, so any
weight encoding pairs with any activation encoding (``apnumba.reference`` derives
the product).

Quantizer (the same arithmetic in numpy and on the GPU, so codes match bit for bit)::

    unsigned / signed:  code = clamp(rint(float32(x) / float32(scale)), lo - zp, hi - zp) + zp
    binary:             code = +1 if x >= 0 else -1

``rint`` rounds half to even; the division is IEEE float32; the clamp saturates
(+-inf included); ``-0.0`` quantizes like ``0.0`` (to ``zp``, or to +1 in binary);
NaN quantizes like 0.0.  ``zero_point`` exists for unsigned encodings only;
dequantize gives ``(code - zero_point) * scale``.
"""

from dataclasses import dataclass
from enum import Enum
import re

import numpy as np

MAX_BITS = 8


class Encoding(str, Enum):
    UNSIGNED = "unsigned"
    SIGNED = "signed"
    BINARY = "binary"

    @property
    def code(self):
        """Small integer passed to kernels: 0 unsigned, 1 signed, 2 binary."""
        return _ENCODING_CODES[self]


_ENCODING_CODES = {Encoding.UNSIGNED: 0, Encoding.SIGNED: 1, Encoding.BINARY: 2}
_SHORT = {"u": Encoding.UNSIGNED, "s": Encoding.SIGNED, "b": Encoding.BINARY}


@dataclass(frozen=True)
class Precision:
    """``bits`` in 1..8 and an :class:`Encoding`; ``Precision.parse("u2")`` is short for it."""

    bits: int
    encoding: Encoding = Encoding.UNSIGNED

    def __post_init__(self):
        try:
            encoding = Encoding(self.encoding)
        except ValueError:
            raise ValueError(
                f"encoding: expected one of {[e.value for e in Encoding]}, got {self.encoding!r}"
            ) from None
        object.__setattr__(self, "encoding", encoding)
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise TypeError(f"bits: expected an integer in 1..{MAX_BITS}, got {self.bits!r}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits: expected an integer in 1..{MAX_BITS}, got {self.bits}")
        object.__setattr__(self, "bits", int(self.bits))
        if encoding is Encoding.BINARY and self.bits != 1:
            raise ValueError(f"bits: the binary (+-1) encoding has exactly 1 bit, got {self.bits}")

    @classmethod
    def parse(cls, spec):
        """``"u4"`` -> 4-bit unsigned, ``"s8"`` -> 8-bit signed, ``"b1"`` -> +-1.  Precisions pass through."""
        if isinstance(spec, Precision):
            return spec
        m = re.fullmatch(r"([usb])(\d+)", str(spec).strip().lower())
        if not m:
            raise ValueError(f"precision: expected 'u<bits>', 's<bits>' or 'b1' (e.g. 'u2'), got {spec!r}")
        return cls(int(m.group(2)), _SHORT[m.group(1)])

    @property
    def short(self):
        return f"{self.encoding.value[0]}{self.bits}"

    def __str__(self):
        return self.short

    @property
    def lo(self):
        """Smallest value."""
        if self.encoding is Encoding.UNSIGNED:
            return 0
        if self.encoding is Encoding.SIGNED:
            return -(1 << (self.bits - 1))
        return -1

    @property
    def hi(self):
        """Largest value."""
        if self.encoding is Encoding.UNSIGNED:
            return (1 << self.bits) - 1
        if self.encoding is Encoding.SIGNED:
            return (1 << (self.bits - 1)) - 1
        return 1

    @property
    def max_abs(self):
        return max(abs(self.lo), abs(self.hi))

    @property
    def coef(self):
        """Weight of each bit plane, plane 0 first (``v = sum coef[j] * bit_j + offset``)."""
        c = [1 << j for j in range(self.bits)]
        if self.encoding is Encoding.SIGNED:
            c[-1] = -c[-1]
        elif self.encoding is Encoding.BINARY:
            c = [2]
        return tuple(c)

    @property
    def offset(self):
        return -1 if self.encoding is Encoding.BINARY else 0

    def contains(self, values):
        """True where ``values`` are valid codes of this precision."""
        v = np.asarray(values)
        if self.encoding is Encoding.BINARY:
            return (v == 1) | (v == -1)
        return (v >= self.lo) & (v <= self.hi)

    def check_codes(self, values, name="values"):
        """Raise ValueError unless every element of ``values`` is an integer code of this precision."""
        v = np.asarray(values)
        if not (np.issubdtype(v.dtype, np.integer) or v.dtype == np.bool_):
            raise TypeError(f"{name}: expected integer codes of precision {self}, got dtype {v.dtype}")
        bad = ~self.contains(v)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            allowed = "-1 or +1" if self.encoding is Encoding.BINARY else f"{self.lo}..{self.hi}"
            raise ValueError(f"{name}: precision {self} holds {allowed}, got {v[idx]} at index {idx}")
        return v


def parse_wa(spec):
    """``"w1a2"`` -> (weight, activation) precisions with apnumba's defaults.

    Weights: 1 bit is binary (+-1), more bits are signed.  Activations are
    unsigned (they follow a ReLU).  Either side may name an encoding explicitly:
    ``"wb1as4"``, ``"wu2au2"``.
    """
    m = re.fullmatch(r"w([usb]?)(\d+)a([usb]?)(\d+)", str(spec).strip().lower())
    if not m:
        raise ValueError(f"bit widths: expected 'w<bits>a<bits>' such as 'w1a2', got {spec!r}")
    wenc, wbits, aenc, abits = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    wenc = _SHORT[wenc] if wenc else (Encoding.BINARY if wbits == 1 else Encoding.SIGNED)
    aenc = _SHORT[aenc] if aenc else Encoding.UNSIGNED
    return Precision(wbits, wenc), Precision(abits, aenc)


def normalize_scale(scale, rows, name="scale"):
    """A float32 array of per-row scales (length ``rows``) from a scalar or a 1-D array."""
    s = np.asarray(scale, dtype=np.float64)
    if s.ndim == 0:
        s = np.full(rows, s)
    elif s.ndim != 1 or s.shape[0] != rows:
        raise ValueError(f"{name}: expected a scalar or one value per row ({rows}), got shape {s.shape}")
    s32 = s.astype(np.float32)
    if not (np.isfinite(s32).all() and (s32 > 0).all()):
        raise ValueError(f"{name}: expected positive finite float32 values, got {s[~(np.isfinite(s32) & (s32 > 0))][:4]}")
    return s32


def check_zero_point(precision, zero_point):
    zp = int(zero_point)
    if zp != zero_point:
        raise ValueError(f"zero_point: expected an integer, got {zero_point!r}")
    if zp and precision.encoding is not Encoding.UNSIGNED:
        raise ValueError(f"zero_point: only unsigned encodings take a zero point, {precision} got {zp}")
    if not precision.lo <= zp <= precision.hi:
        raise ValueError(f"zero_point: expected {precision.lo}..{precision.hi} for {precision}, got {zp}")
    return zp


def quantize(x, precision, scale=1.0, zero_point=0):
    """Float array (rows, ...) -> int32 codes.  ``scale`` is a scalar or one value per row (axis 0)."""
    precision = Precision.parse(precision)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x: expected a float array, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if precision.encoding is Encoding.BINARY:
        return np.where(np.isnan(x) | (x >= 0), 1, -1).astype(np.int32)
    zp = check_zero_point(precision, zero_point)
    rows = x.shape[0] if x.ndim else 1
    s = normalize_scale(scale, rows).reshape((rows,) + (1,) * max(x.ndim - 1, 0))
    if x.ndim == 0:
        s = s.reshape(())
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.rint(x / s)
        t = np.where(np.isnan(t), np.float32(0), t)
        t = np.clip(t, np.float32(precision.lo - zp), np.float32(precision.hi - zp))
    return (t.astype(np.int32) + zp).astype(np.int32)


def dequantize(codes, precision, scale=1.0, zero_point=0):
    """int codes -> float32 ``(code - zero_point) * scale``."""
    precision = Precision.parse(precision)
    codes = precision.check_codes(codes, "codes")
    rows = codes.shape[0] if codes.ndim else 1
    s = normalize_scale(scale, rows).reshape((rows,) + (1,) * max(codes.ndim - 1, 0))
    zp = check_zero_point(precision, zero_point)
    return ((codes.astype(np.float32) - np.float32(zp)) * s).astype(np.float32)
