"""Layers, named and ordered as in torch.nn, that describe a quantized network.

A layer holds host-side parameters only: weight codes with their precision and per-channel scale,
bias, batch-norm statistics, and how its output is quantized (:class:`Act`).  ``Network`` (in
``apnumba.layers.network``) plans them onto the GPU: it packs weights once, folds batch norm, ReLU,
residuals and the next layer's quantizer into each product's epilogue, and allocates every buffer.
Layers know nothing of PTX; kernels know nothing of layers.
"""

from dataclasses import dataclass

import numpy as np

from .. import reference
from ..precision import Encoding, Precision


@dataclass
class Act:
    """How a tensor between layers is quantized: value = (code - zero_point) * scale."""

    precision: Precision
    scale: float
    zero_point: int = 0

    def __post_init__(self):
        self.precision = Precision.parse(self.precision)
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale: expected a positive finite number, got {self.scale}")


class Module:
    """Base: children in order (``modules()``), a readable repr."""

    def modules(self):
        return [self]

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items())
        return f"{type(self).__name__}({args})"

    def describe(self):
        return {}


class _Weighted(Module):
    """Conv2d and Linear: weight codes (out, ...) of ``weight_precision``, per-output-channel scales, bias."""

    def __init__(self, weight_shape, bias, weight_precision, out_act, seed):
        self.weight_precision = Precision.parse(weight_precision)
        rng = np.random.default_rng(seed)
        p = self.weight_precision
        if p.encoding is Encoding.SIGNED and p.bits > 1:  # zero-mean: leave out the lone most negative code
            self.weight = rng.integers(-p.hi, p.hi + 1, size=weight_shape).astype(np.int32)
        else:
            self.weight = reference.random_codes(rng, weight_shape, p)
        fan_in = int(np.prod(weight_shape[1:]))
        # He-like: a weight's value spread ~ sqrt(2 / fan_in), whatever the codes' range.
        spread = float(np.sqrt(np.mean(self.weight.astype(np.float64) ** 2))) or 1.0
        self.weight_scale = np.full(weight_shape[0], np.sqrt(2.0 / fan_in) / spread)
        self.bias = np.zeros(weight_shape[0]) if bias else None
        self.out_act = out_act

    @property
    def out_channels(self):
        return self.weight.shape[0]

    def load(self, codes, scale, bias=None):
        """Set the weights: integer ``codes`` of this layer's shape and precision, per-channel ``scale``."""
        codes = self.weight_precision.check_codes(np.asarray(codes), "codes")
        if codes.shape != self.weight.shape:
            raise ValueError(f"codes: expected shape {self.weight.shape}, got {codes.shape}")
        self.weight = codes.astype(np.int32)
        self.weight_scale = np.broadcast_to(np.asarray(scale, np.float64), (codes.shape[0],)).copy()
        if bias is not None:
            self.bias = np.asarray(bias, np.float64).reshape(codes.shape[0])
        return self


class Conv2d(_Weighted):
    """torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias) with ``weight_bits``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, *,
                 weight_bits="b1", out_act=None, seed=0):
        for name, v, least in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                               ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
            if int(v) != v or v < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got {v!r}")
        self.in_channels, self.kernel_size, self.stride, self.padding = in_channels, kernel_size, stride, padding
        super().__init__((out_channels, kernel_size, kernel_size, in_channels), bias, weight_bits, out_act, seed)

    def describe(self):
        return {"in": self.in_channels, "out": self.out_channels, "k": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "w": str(self.weight_precision)}


class Linear(_Weighted):
    """torch.nn.Linear(in_features, out_features, bias) with ``weight_bits``; weights in torch's column order."""

    def __init__(self, in_features, out_features, bias=True, *, weight_bits="b1", out_act=None, seed=0):
        self.in_features = in_features
        super().__init__((out_features, in_features), bias, weight_bits, out_act, seed)

    def describe(self):
        return {"in": self.in_features, "out": self.out_channels, "w": str(self.weight_precision)}


class BatchNorm2d(Module):
    """torch.nn.BatchNorm2d in eval mode: folded into the preceding product's epilogue."""

    def __init__(self, num_features, eps=1e-5):
        self.num_features, self.eps = num_features, eps
        self.weight = np.ones(num_features)
        self.bias = np.zeros(num_features)
        self.running_mean = np.zeros(num_features)
        self.running_var = np.ones(num_features)

    def fold(self):
        """(g, h): batch norm is y -> g * y + h per channel."""
        g = self.weight / np.sqrt(self.running_var + self.eps)
        return g, self.bias - g * self.running_mean

    def describe(self):
        return {"features": self.num_features}


class ReLU(Module):
    pass


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel_size, self.stride, self.padding = kernel_size, stride or kernel_size, padding

    def describe(self):
        return {"k": self.kernel_size, "stride": self.stride, "padding": self.padding}


class AvgPool2d(Module):
    """torch.nn.AvgPool2d (count_include_pad); its output is quantized as ``out_act`` (default: its input's)."""

    def __init__(self, kernel_size, stride=None, padding=0, *, out_act=None):
        self.kernel_size, self.stride, self.padding = kernel_size, stride or kernel_size, padding
        self.out_act = out_act

    def describe(self):
        return {"k": self.kernel_size, "stride": self.stride, "padding": self.padding}


class Flatten(Module):
    pass


class Sequential(Module):
    def __init__(self, *layers):
        self.layers = list(layers)

    def modules(self):
        return [m for layer in self.layers for m in layer.modules()]

    def __repr__(self):
        inner = "\n".join("  " + repr(layer).replace("\n", "\n  ") for layer in self.layers)
        return f"Sequential(\n{inner}\n)"


class BasicBlock(Module):
    """ResNet's basic block: conv3x3 (stride) - BN - ReLU - conv3x3 - BN, plus the shortcut (identity, or
    conv1x1 stride - BN when the shape changes), then ReLU.  The add and the ReLU fuse into conv2's epilogue."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, *, weight_bits="b1", act=None, seed=0):
        self.conv1 = Conv2d(in_planes, planes, 3, stride, 1, bias=False, weight_bits=weight_bits, out_act=act, seed=seed)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, 1, 1, bias=False, weight_bits=weight_bits, out_act=act, seed=seed + 1)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = Sequential(
                Conv2d(in_planes, planes, 1, stride, 0, bias=False, weight_bits=weight_bits, out_act=act, seed=seed + 2),
                BatchNorm2d(planes),
            )

    def describe(self):
        return {"in": self.conv1.in_channels, "planes": self.conv1.out_channels, "stride": self.conv1.stride,
                "downsample": self.downsample is not None}
