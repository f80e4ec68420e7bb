"""PackedTensor: a (rows, K) integer tensor held as packed bit planes on the GPU.

Weights are packed once, at load; activations are packed per call into a
PackedTensor allocated once (``out=``), so a forward pass allocates nothing.
"""

import functools

import numpy as np
from numba import cuda

from . import reference
from .device import as_device_array, require_gpu, zero_fill
from .kernels import pack as pack_kernels
from .precision import Precision, check_zero_point, normalize_scale


def _launch_stream(stream):
    return stream if stream else cuda.default_stream()


@functools.lru_cache(maxsize=None)
def _cached_i32(values):
    """A small int32 device array per distinct tuple (made once: launches stay copy-free, graph-capturable)."""
    return cuda.to_device(np.asarray(values, np.int32))


def _rows(codes, name):
    """(rows, K) codes and the image shape (N, H, W) if they were NHWC images."""
    if codes.ndim == 4:
        n, h, w, c = codes.shape
        return codes.reshape(n * h * w, c), (n, h, w)
    if codes.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (rows, K) array or NHWC images (N, H, W, C), got shape {codes.shape}")
    return codes, None


def _image_geometry(x, layout):
    """(N, C, H, W, element strides by (n, h, w, c)) of a contiguous 4-D image batch in ``layout``."""
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout: expected 'NCHW' or 'NHWC', got {layout!r}")
    if layout == "NCHW":
        N, C, H, W = x.shape
        return N, C, H, W, (C * H * W, W, 1, H * W)
    N, H, W, C = x.shape
    return N, C, H, W, (H * W * C, W * C, C, 1)


class PackedTensor:
    """Bit planes of integer codes ``(rows, K)`` of one :class:`~apnumba.precision.Precision`.

    Attributes: ``words`` (device uint32, shape (bits, rows, kwords), the layout in
    :mod:`apnumba.reference`), ``rowsum`` (device int32 (rows,), the sum of each
    row's codes, used by the correction terms of binary encodings), ``scale``
    (float32 per row), ``zero_point``, ``packing`` ("bits", or "bytes": one plane of
    int8 values, words (1, rows, kwords), for the int8 tensor cores - ``reference``).
    ``compact``: bytes of at most 4 per row (an image's pixels) in one word a row instead of a
    padded k-step - a convolution's input only (:meth:`from_image`).
    """

    def __init__(self, words, rowsum, shape, precision, scale=1.0, zero_point=0, image=None, packing="bits",
                 compact=False):
        self.precision = Precision.parse(precision)
        self.packing = reference.check_packing(packing)
        rows, K = (int(s) for s in shape)
        if rows < 1 or K < 1:
            raise ValueError(f"shape: expected rows >= 1 and K >= 1, got {shape}")
        self.shape = (rows, K)
        self.compact = bool(compact)
        if self.compact and (packing != "bytes" or K > 4):
            raise ValueError(f"compact: one word a row holds at most 4 bytes (packing='bytes'), got K={K}, packing={packing!r}")
        self.kwords = 1 if self.compact else reference.padded_words(K, packing)
        expect = (self.planes, rows, self.kwords)
        if tuple(words.shape) != expect or np.dtype(words.dtype) != np.uint32:
            raise ValueError(f"words: expected uint32 {expect}, got {np.dtype(words.dtype).name} {tuple(words.shape)}")
        if tuple(rowsum.shape) != (rows,) or np.dtype(rowsum.dtype) != np.int32:
            raise ValueError(f"rowsum: expected int32 ({rows},), got {np.dtype(rowsum.dtype).name} {tuple(rowsum.shape)}")
        self.words = words
        self.rowsum = rowsum
        self.scale = normalize_scale(scale, rows)
        self.zero_point = check_zero_point(self.precision, zero_point)
        if image is not None:
            image = tuple(int(v) for v in image)
            if len(image) != 3 or image[0] * image[1] * image[2] != rows:
                raise ValueError(f"image: expected (N, H, W) with N*H*W = {rows} rows, got {image}")
        self.image = image  # (N, H, W) when the rows are the pixels of NHWC images

    rows = property(lambda self: self.shape[0])
    K = property(lambda self: self.shape[1])
    bits = property(lambda self: self.precision.bits)
    planes = property(lambda self: reference.planes(self.precision, self.packing))

    def __repr__(self):
        extra = (", packing='bytes'" if self.packing == "bytes" else "") + (", compact=True" if self.compact else "")
        return f"PackedTensor(shape={self.shape}, precision={self.precision}, kwords={self.kwords}{extra})"

    def require_bits(self, name, op):
        """Raise unless this tensor holds bit planes (the packed ops and fused epilogues read planes)."""
        if self.packing != "bits":
            raise ValueError(f"{name}: {op} reads bit planes, got a PackedTensor with packing={self.packing!r}")

    @classmethod
    def empty(cls, shape, precision, scale=1.0, zero_point=0, packing="bits", compact=False):
        """Device buffers for a tensor to be filled by :meth:`pack_` (or a kernel's epilogue)."""
        require_gpu()
        precision = Precision.parse(precision)
        rows, K = shape
        kwords = 1 if compact else reference.padded_words(K, packing)
        # Zeroed once: the padding words past K are never written by any kernel and must stay zero.
        words = cuda.to_device(np.zeros((reference.planes(precision, packing), rows, kwords), dtype=np.uint32))
        rowsum = cuda.device_array(rows, dtype=np.int32)
        return cls(words, rowsum, shape, precision, scale, zero_point, packing=packing, compact=compact)

    @classmethod
    def from_codes(cls, codes, precision, scale=1.0, zero_point=0, packing="bits"):
        """Pack host integer codes (rows, K) - or NHWC images (N, H, W, C) - and upload them."""
        require_gpu()
        precision = Precision.parse(precision)
        codes = precision.check_codes(np.asarray(codes), "codes")
        codes, image = _rows(codes, "codes")
        words = cuda.to_device(reference.pack(codes, precision, packing))
        rowsum = cuda.to_device(reference.row_sums(codes))
        return cls(words, rowsum, codes.shape, precision, scale, zero_point, image, packing)

    @classmethod
    def from_float(cls, x, precision, scale=1.0, zero_point=0, stream=0, packing="bits"):
        """Quantize and pack a float32/float16 (rows, K) array - or NHWC images (N, H, W, C) - on the GPU."""
        require_gpu()
        x = as_device_array(x, "x", dtypes=(np.float32, np.float16))
        image = None
        if len(x.shape) == 4:
            image = tuple(x.shape[:3])
            x = x.reshape(image[0] * image[1] * image[2], x.shape[3])
        elif len(x.shape) != 2:
            raise ValueError(f"x: expected a (rows, K) array or NHWC images (N, H, W, C), got shape {tuple(x.shape)}")
        out = cls.empty(x.shape, precision, scale, zero_point, packing)
        out.image = image
        return out.pack_(x, stream=stream)

    @classmethod
    def from_patches(cls, x, kernel_size, stride=1, padding=0, precision="u8", scale=1.0, zero_point=0, layout="NCHW",
                     out=None, stream=0, packing="bits"):
        """A bit-packed first layer's input: quantize float images and pack every output pixel's receptive
        field as bit planes (a 147-feature 7x7 RGB field fills one 256-bit k-step, where direct taps of
        3 channels would take seven).

        Rows are the output pixels, K = kernel_size^2 * C features in (r, s, c) order, zero outside the
        image - the layer then runs as a 1x1 convolution over these rows (``image`` is (N, OH, OW)).
        ``x``: float32/float16, NCHW or NHWC (``layout``), host or device.  ``out``: a PackedTensor to
        fill (allocated once by a network), else a new one.  The quantizer is reference.quantize's.
        Byte packing has no receptive fields: :meth:`from_image` and a convolution that reads the pixels.
        """
        require_gpu()
        if reference.check_packing(packing) == "bytes" or (out is not None and out.packing == "bytes"):
            raise ValueError("packing: receptive fields are packed as bits only; for bytes use PackedTensor.from_image "
                             "and convolve it (apconv reads the image's bytes directly)")
        x = as_device_array(x, "x", dtypes=(np.float32, np.float16), ndim=4)
        N, C, H, W, strides = _image_geometry(x, layout)
        k = int(kernel_size)
        OH = reference.conv_output_size(H, k, stride, padding)
        OW = reference.conv_output_size(W, k, stride, padding)
        shape = (N * OH * OW, k * k * C)
        if out is None:
            out = cls.empty(shape, precision, scale, zero_point, packing)
        elif out.shape != shape:
            raise ValueError(f"out: expected a PackedTensor of shape {shape}, got {out.shape}")
        out.image = (N, OH, OW)
        if not hasattr(out, "_scale_dev"):
            out._scale_dev = cuda.to_device(out.scale[:1])
        geometry = _cached_i32((N, H, W, C, k, k, int(stride), int(padding), OH, OW))
        grid = -(-shape[0] // pack_kernels.WARPS_PER_BLOCK)
        kernel = pack_kernels.pack_patches_kernel(out.bits, out.precision.encoding.code)
        kernel[grid, 32 * pack_kernels.WARPS_PER_BLOCK, _launch_stream(stream)](
            x.reshape(x.size), geometry, _cached_i32(strides), out._scale_dev, out.zero_point,
            out.words.reshape(out.words.size), out.kwords, out.rowsum,
        )
        return out

    @classmethod
    def from_image(cls, x, precision="s8", scale=1.0, zero_point=0, layout="NCHW", out=None, stream=0):
        """A byte-packed first layer's input: quantize float images into NHWC pixels of code bytes, which
        the convolution reads directly (no receptive fields are materialized).  At most 4 channels
        (RGB, RGBA, grey) take one word a pixel (``compact``); more take padded rows.

        ``x``: float32/float16 (N, C, H, W) or (N, H, W, C) by ``layout``, host or device.  ``out``: a
        tensor of this shape to fill (a network allocates it once).  The quantizer is reference.quantize's.
        """
        require_gpu()
        x = as_device_array(x, "x", dtypes=(np.float32, np.float16), ndim=4)
        N, C, H, W, strides = _image_geometry(x, layout)
        shape = (N * H * W, C)
        if out is None:
            out = cls.empty(shape, precision, scale, zero_point, "bytes", compact=C <= 4)
        elif out.shape != shape or out.packing != "bytes":
            raise ValueError(f"out: expected a byte-packed PackedTensor of shape {shape}, got {out!r}")
        out.image = (N, H, W)
        if not hasattr(out, "_scale_dev"):
            out._scale_dev = cuda.to_device(out.scale[:1])
        kernel = pack_kernels.quantize_pixels_bytes_kernel(out.bits, out.precision.encoding.code)
        kernel[-(-shape[0] // 256), 256, _launch_stream(stream)](
            x.reshape(x.size), _cached_i32((N, H, W, C)), _cached_i32(strides), out._scale_dev, out.zero_point,
            out.words.reshape(out.words.size), out.kwords, out.rowsum)
        return out

    def pack_(self, x, stream=0):
        """Quantize and pack ``x`` (float32/float16, shape (rows, K), device) into this tensor, in place."""
        x = as_device_array(x, "x", dtypes=(np.float32, np.float16), ndim=2)
        if tuple(x.shape) != self.shape:
            raise ValueError(f"x: expected shape {self.shape}, got {tuple(x.shape)}")
        if not x.is_c_contiguous():
            raise ValueError("x: expected a C-contiguous array")
        stream = _launch_stream(stream)
        rows, K = self.shape
        if not hasattr(self, "_scale_dev"):
            self._scale_dev = cuda.to_device(self.scale)
        if self.packing == "bytes":
            segment, blocks = self._byte_rows_grid()
            kernel = pack_kernels.pack_rows_bytes_kernel(self.bits, self.precision.encoding.code, segment)
            kernel[blocks, 32 * pack_kernels.WARPS_PER_BLOCK, stream](
                x.reshape(rows * K), rows, K, K, self._scale_dev, 1, self.zero_point,
                self.words.reshape(self.words.size), self.kwords, self.rowsum,
            )
            return self
        zero_fill(self.rowsum, stream)
        grid = (-(-rows // pack_kernels.WARPS_PER_BLOCK), self.kwords // pack_kernels.CHUNK_WORDS)
        pack_kernels.pack_rows_kernel[grid, 32 * pack_kernels.WARPS_PER_BLOCK, stream](
            x.reshape(rows * K), rows, K, K, self._scale_dev, 1, self.zero_point,
            self.bits, self.precision.encoding.code, self.words.reshape(self.words.size), self.kwords, self.rowsum,
        )
        return self

    def _byte_rows_grid(self):
        """(lanes per row, blocks to cover every row) of the byte packers' segment layout."""
        segment = pack_kernels.byte_segment(-(-self.K // 4))
        return segment, -(-self.rows // (pack_kernels.WARPS_PER_BLOCK * (32 // segment)))

    def codes(self, stream=0):
        """Unpack on the GPU (bytes: a copy and a view): host int32 codes (rows, K)."""
        if self.packing == "bytes":
            words = self.words.copy_to_host()
            if self.compact:  # to the padded layout reference.unpack reads
                words = np.pad(words, ((0, 0), (0, 0), (0, reference.padded_words(self.K, "bytes") - 1)))
            return reference.unpack(words, self.precision, self.K, "bytes")
        rows, K = self.shape
        out = cuda.device_array(rows * K, dtype=np.int32)
        threads = 256
        pack_kernels.unpack_rows_kernel[(rows, -(-K // threads)), threads, _launch_stream(stream)](
            self.words.reshape(self.words.size), rows, K, self.kwords, self.bits, self.precision.encoding.code, out
        )
        return out.copy_to_host().reshape(rows, K)

    def words_host(self):
        return self.words.copy_to_host()

    def rowsum_host(self):
        return self.rowsum.copy_to_host()

    def dequantize(self):
        """Host float32 ``(code - zero_point) * scale``."""
        return (self.codes().astype(np.float32) - np.float32(self.zero_point)) * self.scale[:, None]
