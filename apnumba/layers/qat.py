"""Quantization-aware training in torch, with the quantizers apnumba imports (torch is an optional extra).

Build a model from these modules and torch.nn's ``BatchNorm2d`` / ``BatchNorm1d``, ``ReLU``, ``MaxPool2d``,
``AvgPool2d``, ``Flatten``, ``Dropout``; train it as usual; then ``apnumba.layers.from_torch(model)``
turns it into an apnumba model.  The quantizers, exactly (``QUANTIZER`` names this definition; the
importer refuses any other):

Activations, ``QuantAct(bits, signed)``, one learned scale ``s > 0`` per tensor, no zero point::

    code  = clamp(round_half_even(x / s), lo, hi)      x / s in float32
    value = code * s
    unsigned b bits: lo, hi = 0, 2^b - 1                (apnumba precision u<b>)
    signed b >= 2:   lo, hi = -2^(b-1), 2^(b-1) - 1     (s<b>)
    signed b = 1:    code = +1 if x >= 0 else -1        (b1, the +-1 encoding)

Weights, ``QuantConv2d`` / ``QuantLinear(..., weight_bits=b)``, one scale per output channel c,
recomputed from the float weights at every step (not learned)::

    b >= 2: s_c = max|w_c| / (2^(b-1) - 1),  code = clamp(round_half_even(w / s_c), -(2^(b-1) - 1), 2^(b-1) - 1)
            (symmetric "narrow range"; a channel of zeros gets s_c = 1)      (s<b>)
    b = 1:  s_c = mean|w_c|,  code = +1 if w >= 0 else -1                      (b1)

Gradients: straight-through for round and sign (zero outside the clamp range for activations); the
activation scale learns by LSQ (Esser et al., ICLR 2020: gradient scaled by 1/sqrt(numel * hi)) and is
initialised from the first training batch as 2 mean|x| / sqrt(hi).  ``bits=None`` anywhere means "not
quantized" (a float baseline of the same network; such a model does not import).

apnumba runs the same codes exactly; what can differ from the fake-quant model in torch is float rounding
between two quantizers (torch sums the convolution in float32 and applies batch norm on its own; apnumba
sums integers exactly and applies one folded float32 scale and shift), which moves a code only where a
value lies within a few float32 ulps of a rounding tie.  ``apnumba.layers.compare`` counts those.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

QUANTIZER = "apnumba-symmetric-v1"


def act_range(bits, signed):
    """(lo, hi) codes of an activation quantizer."""
    if signed:
        return (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return 0, 2**bits - 1


def act_precision(bits, signed):
    """The apnumba precision name of an activation quantizer."""
    return "b1" if signed and bits == 1 else f"{'s' if signed else 'u'}{bits}"


def weight_precision(bits):
    return "b1" if bits == 1 else f"s{bits}"


def _check_bits(name, bits):
    if bits is not None and (int(bits) != bits or not 1 <= bits <= 8):
        raise ValueError(f"{name}: expected None (no quantization) or an integer from 1 to 8, got {bits!r}")


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)  # half to even, as numpy's rint and the GPU's cvt.rni

    @staticmethod
    def backward(ctx, g):
        return g


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)  # the hard-tanh estimator


class _ScaledGrad(torch.autograd.Function):
    """s itself in the forward pass (bit for bit); its gradient times ``factor`` (LSQ's step-size scale)."""

    @staticmethod
    def forward(ctx, s, factor):
        ctx.factor = factor
        return s.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def weight_codes(w, bits):
    """Per-output-channel (codes, scales) of float weights ``w`` (out, ...): the documented weight quantizer.
    Codes are float tensors holding integers; gradients flow straight through to ``w``."""
    flat = w.reshape(w.shape[0], -1)
    if bits == 1:
        scale = flat.abs().mean(dim=1)
        codes = _SignSTE.apply(flat)
    else:
        qmax = 2 ** (bits - 1) - 1
        scale = flat.abs().amax(dim=1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).detach()
        codes = torch.clamp(_RoundSTE.apply(flat / scale[:, None]), -qmax, qmax)
    return codes.reshape(w.shape), scale


class QuantAct(nn.Module):
    """Quantize activations to ``bits`` (unsigned, or ``signed``) with one learned scale; see the module doc.

    Put one before every QuantConv2d / QuantLinear (the first one quantizes the network's input)."""

    quantizer = QUANTIZER

    def __init__(self, bits, signed=False, scale=None):
        super().__init__()
        _check_bits("bits", bits)
        self.bits, self.signed = bits, bool(signed)
        self.scale = nn.Parameter(torch.tensor(float(scale if scale is not None else 1.0)))
        self.register_buffer("initialized", torch.tensor(scale is not None))

    @property
    def range(self):
        return act_range(self.bits, self.signed)

    def codes(self, x):
        """The integer codes (as float) of ``x``, without gradients: what apnumba computes."""
        with torch.no_grad():
            if self.signed and self.bits == 1:
                return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
            lo, hi = self.range
            return torch.clamp(torch.round(x / self.scale.detach()), lo, hi)

    def forward(self, x):
        if self.bits is None:
            return x
        lo, hi = self.range
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                self.scale.copy_(2 * x.detach().abs().mean().clamp_min(1e-8) / math.sqrt(max(hi, 1)))
                self.initialized.fill_(True)
        s = _ScaledGrad.apply(self.scale, 1.0 / math.sqrt(x.numel() / max(x.shape[0], 1) * max(hi, 1)))
        if self.signed and self.bits == 1:
            return _SignSTE.apply(x / s) * s
        return _RoundSTE.apply(torch.clamp(x / s, lo, hi)) * s

    def extra_repr(self):
        return f"bits={self.bits}, signed={self.signed}, scale={float(self.scale):.6g}"


class _QuantizedWeight:
    """What QuantConv2d and QuantLinear share: the weight quantizer and its bits."""

    quantizer = QUANTIZER

    def _set_weight_bits(self, weight_bits):
        _check_bits("weight_bits", weight_bits)
        self.weight_bits = weight_bits

    def quantized_weight(self):
        """(codes, per-channel scales) of the current weights - what the importer packs."""
        return weight_codes(self.weight, self.weight_bits)

    def fake_quantized_weight(self):
        """codes * scale, shaped like the weights (what the training forward pass multiplies by)."""
        codes, scale = self.quantized_weight()
        return codes * scale.reshape(-1, *(1,) * (codes.dim() - 1))

    def extra_repr(self):
        return super().extra_repr() + f", weight_bits={self.weight_bits}"


class QuantConv2d(_QuantizedWeight, nn.Conv2d):
    """torch.nn.Conv2d whose weights are quantized to ``weight_bits`` per output channel (see the module doc)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, *, weight_bits=2):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self._set_weight_bits(weight_bits)

    def forward(self, x):
        if self.weight_bits is None:
            return super().forward(x)
        return F.conv2d(x, self.fake_quantized_weight(), self.bias, self.stride, self.padding)


class QuantLinear(_QuantizedWeight, nn.Linear):
    """torch.nn.Linear whose weights are quantized to ``weight_bits`` per output feature (see the module doc)."""

    def __init__(self, in_features, out_features, bias=True, *, weight_bits=2):
        super().__init__(in_features, out_features, bias=bias)
        self._set_weight_bits(weight_bits)

    def forward(self, x):
        if self.weight_bits is None:
            return super().forward(x)
        return F.linear(x, self.fake_quantized_weight(), self.bias)
