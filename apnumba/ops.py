"""Operations on packed NHWC tensors that a network needs between its products.

Where they can, networks fuse these into the product's epilogue (``apconv(..., out=PackedTensor,
residual=..., relu=...)``); these standalone versions cover the rest: pooling, a residual add, and
the flatten between the last convolution and the first fully connected layer.
"""

import functools

import numpy as np
from numba import cuda

from . import reference
from .device import is_device_array, require_gpu, zero_fill
from .kernels import packed_ops as K
from .packed import PackedTensor
from .precision import Encoding


def _image(x, name="x", op="this op"):
    if not isinstance(x, PackedTensor) or x.image is None:
        raise TypeError(f"{name}: expected a PackedTensor of NHWC images")
    x.require_bits(name, op)
    return x.image


def _launch(kernel, rows, stream, *args):
    kernel[-(-rows // K.WARPS_PER_BLOCK), 32 * K.WARPS_PER_BLOCK, stream or cuda.default_stream()](*args)


@functools.lru_cache(maxsize=None)
def _params(values):
    """A small int32 device array, made once per distinct value tuple (nothing is copied at launch time,
    so the launches can be captured into a CUDA graph)."""
    return cuda.to_device(np.asarray(values, np.int32))


def _i32(values):
    return _params(tuple(int(v) for v in values))


def _f32_device(v, n, name):
    if is_device_array(v):
        return v
    v = np.asarray(v, np.float32)
    if v.shape != (n,):
        raise ValueError(f"{name}: expected {n} values, got shape {v.shape}")
    return cuda.to_device(v)


def _pool_shape(x, kernel_size, stride, padding):
    N, H, W = _image(x, op="pooling")
    stride = stride or kernel_size
    OH = reference.conv_output_size(H, kernel_size, stride, padding)
    OW = reference.conv_output_size(W, kernel_size, stride, padding)
    return (N, H, W), stride, (N, OH, OW)


def _pool(x, out, kernel_size, stride, padding, out_image, stream, avg_multiplier=None, zero_rowsum=True):
    """Pool x into out.  Max (no ``avg_multiplier``): the bit-sliced kernel, one thread per output word;
    average: one warp per output word.  Both add each word's code sum to the row sums, zeroed first
    (``zero_rowsum=False``: by the caller, before the launch)."""
    (N, H, W), (_, OH, OW) = x.image, out_image
    out.require_bits("out", "pooling")
    out.image = out_image
    geometry = _i32([N, H, W, x.K, kernel_size, stride, padding, OH, OW, x.kwords])
    stream = stream or cuda.default_stream()
    if zero_rowsum:
        zero_fill(out.rowsum, stream)
    words = N * OH * OW * -(-x.K // 32)
    enc = x.precision.encoding.code
    if avg_multiplier is None:
        K.max_pool_kernel(x.bits, enc, kernel_size)[-(-words // 256), 256, stream](
            x.words.reshape(x.words.size), geometry, out.words.reshape(out.words.size), out.rowsum)
    else:
        kernel = K.avg_pool_kernel(x.bits, enc, out.bits, out.precision.encoding.code, kernel_size)
        _launch(kernel, words, stream, x.words.reshape(x.words.size), geometry, _i32([x.zero_point, out.zero_point]),
                np.float32(avg_multiplier), out.words.reshape(out.words.size), out.rowsum)
    return out


def max_pool2d(x, kernel_size, stride=None, padding=0, out=None, stream=0, zero_rowsum=True):
    """torch.nn.MaxPool2d on packed codes (the maximum code is the maximum value: scales are positive)."""
    require_gpu()
    _, stride, (N, OH, OW) = _pool_shape(x, kernel_size, stride, padding)
    if out is None:
        out = PackedTensor.empty((N * OH * OW, x.K), x.precision, x.scale[0], x.zero_point)
    if out.precision != x.precision or out.zero_point != x.zero_point or out.shape != (N * OH * OW, x.K):
        raise ValueError(f"out: max pooling keeps the precision: expected {x.precision} {(N * OH * OW, x.K)}")
    return _pool(x, out, kernel_size, stride, padding, (N, OH, OW), stream, zero_rowsum=zero_rowsum)


def avg_pool2d(x, kernel_size, stride=None, padding=0, out=None, stream=0, zero_rowsum=True):
    """torch.nn.AvgPool2d (count_include_pad) into ``out``'s precision and scale (default: x's).

    ``code = quantize(float32(window sum of x - zx) * float32(sx / (k*k*so)), out, 1, zo)`` - reference.avg_pool_codes.
    """
    require_gpu()
    _, stride, (N, OH, OW) = _pool_shape(x, kernel_size, stride, padding)
    if out is None:
        if x.precision.encoding is Encoding.BINARY:
            raise ValueError("x: the average of +-1 codes is not a +-1 code; give out= a PackedTensor of another precision")
        out = PackedTensor.empty((N * OH * OW, x.K), x.precision, x.scale[0], x.zero_point)
    if out.shape != (N * OH * OW, x.K):
        raise ValueError(f"out: expected shape {(N * OH * OW, x.K)}, got {out.shape}")
    multiplier = float(x.scale[0]) / (kernel_size * kernel_size * float(out.scale[0]))
    return _pool(x, out, kernel_size, stride, padding, (N, OH, OW), stream, avg_multiplier=multiplier,
                 zero_rowsum=zero_rowsum)


def add(a, b, out, relu=False, stream=0):
    """Residual add into ``out``: ``quantize((a - za) sa / so + (b - zb) sb / so)``, ReLU if asked (reference.add_codes)."""
    require_gpu()
    for name, t in (("a", a), ("b", b), ("out", out)):
        if not isinstance(t, PackedTensor) or t.shape != a.shape:
            raise ValueError(f"{name}: expected a PackedTensor of shape {a.shape}")
        t.require_bits(name, "add")
    so = float(out.scale[0])
    params = _i32([a.bits, a.precision.encoding.code, a.zero_point, b.bits, b.precision.encoding.code, b.zero_point,
                   out.bits, out.precision.encoding.code, out.zero_point, int(bool(relu))])
    out.image = a.image
    _launch(K.add_kernel, a.rows, stream, a.words.reshape(a.words.size), b.words.reshape(b.words.size), a.rows, a.K,
            a.kwords, params, np.float32(float(a.scale[0]) / so), np.float32(float(b.scale[0]) / so),
            out.words.reshape(out.words.size), out.rowsum)
    return out


def check_flattenable(precision, zero_point):
    if precision.encoding is Encoding.BINARY or zero_point:
        raise ValueError("x: flatten keeps the channel padding inside the features, which is exact only when zero bits "
                         f"mean the value 0 (unsigned or signed, no zero point); got {precision} zero point {zero_point}")


def flatten(x, out=None, stream=0):
    """NHWC images (N*H*W rows of C channels) -> N rows of H*W*Cp features, without moving a bit.

    ``out``: a previous flatten of the same ``x`` (a network reuses it): only its row sums are recomputed
    (a 1x1 image's - a global pooling's output - are x's own: nothing is launched).

    The features are in (h, w, c) order with each pixel's channels padded to Cp = 32 * cwords
    (zero bits); a fully connected layer after it packs its weights the same way
    (``reference.flatten_weight_columns``).  Exact for unsigned or signed activations without a
    zero point, whose zero bits are the value 0; refused otherwise.
    """
    require_gpu()
    N, H, W = _image(x, op="flatten")
    check_flattenable(x.precision, x.zero_point)
    pixels = H * W
    if out is None:
        words = x.words.reshape(x.bits, N, pixels * x.kwords)
        rowsum = x.rowsum if pixels == 1 else cuda.device_array(N, np.int32)
        out = PackedTensor(words, rowsum, (N, pixels * x.kwords * 32), x.precision, x.scale[0], x.zero_point)
    if out.rowsum is x.rowsum:
        return out
    K.image_rowsum_kernel[-(-N // 128), 128, stream or cuda.default_stream()](x.rowsum, pixels, N, out.rowsum)
    return out


def requantize(y, scale, bias, out, relu=False, stream=0):
    """int32 sums (rows, C) on the device -> ``out`` (PackedTensor (rows, C)): reference.requantize, unfused.

    Pass scale and bias as device arrays to launch without copies (inside a CUDA graph capture)."""
    require_gpu()
    rows, C = out.shape
    if tuple(y.shape[-1:]) != (C,) or y.size != rows * C or np.dtype(y.dtype) != np.int32:
        raise ValueError(f"y: expected int32 sums with {rows} rows of {C} channels, got {np.dtype(y.dtype).name} {tuple(y.shape)}")
    out.require_bits("out", "requantize")
    params = _i32([out.bits, out.precision.encoding.code, out.zero_point, int(bool(relu))])
    _launch(K.requantize_kernel, rows, stream, y.reshape(y.size), rows, C, out.kwords,
            _f32_device(scale, C, "scale"), _f32_device(bias, C, "bias"), params,
            out.words.reshape(out.words.size), out.rowsum)
    return out
