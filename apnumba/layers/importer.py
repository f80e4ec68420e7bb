"""Import a model trained with ``apnumba.layers.qat`` (torch) into apnumba layers, and compare the two.

``from_torch(model)`` walks an ``nn.Sequential`` (nested ones are flattened) and maps::

    QuantAct first                      the network's input quantizer (``Sequential.input_act``)
    QuantConv2d / QuantLinear           Conv2d / Linear with the weight codes and per-channel scales of
                                        ``quantized_weight()``, bias kept
    BatchNorm2d / BatchNorm1d, ReLU     BatchNorm2d (running statistics; folded by the planner), ReLU
    QuantAct after a product            that product's ``out_act`` (the next layer's codes)
    MaxPool2d (before or after it)      MaxPool2d (max commutes with the monotone quantizer)
    AvgPool2d then QuantAct             AvgPool2d with that ``out_act``
    Flatten                             Flatten (the planner permutes the next Linear's columns)
    Dropout, Identity                   nothing (eval mode)

The last product writes float32 logits, so no QuantAct may follow it.  Anything else - another layer
type, a quantizer that is not ``qat``'s (``QUANTIZER``), grouped or dilated convolutions, ceil-mode
pooling, a product whose input is not quantized - is refused with the layer's name and the reason.

``compare(torch_model, model, x)`` runs both on the same images (apnumba through its numpy twin, which
the GPU equals bit for bit) and counts, step by step, the integer activations that differ, and how many
values of torch's sat near a rounding tie (where float rounding may pick either code).
``from_torch(model, example=x)`` runs that comparison and refuses a model whose codes differ anywhere
else: a quantizer that does not behave as documented is detected, not silently mis-imported.
"""

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import qat
from .modules import Act, AvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from .network import Network


class UnsupportedModelError(ValueError):
    """The torch model has a layer or setting apnumba cannot import (the message names it)."""


class QuantizerMismatch(ValueError):
    """The imported model's integer activations differ from the torch model's beyond float rounding at ties."""


def _leaves(module, prefix=""):
    """(name, module) of the layers in order, nested nn.Sequential flattened."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if type(child) is nn.Sequential:
            yield from _leaves(child, full)
        else:
            yield full, child


def _is_qat(m, cls):
    """Exactly qat's class with qat's quantizer - a subclass could quantize differently."""
    return type(m) is cls and getattr(m, "quantizer", None) == qat.QUANTIZER


def _pair(name, label, v):
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise UnsupportedModelError(f"layer {name}: {label} {v} is not square (apnumba takes one value)")
        v = v[0]
    if not isinstance(v, int):
        raise UnsupportedModelError(f"layer {name}: {label} {v!r} is not an integer")
    return v


def _act(name, m):
    if not _is_qat(m, qat.QuantAct) or type(m).forward is not qat.QuantAct.forward:
        raise UnsupportedModelError(f"layer {name}: {type(m).__name__} is not apnumba.layers.qat.QuantAct "
                                    f"(quantizer {qat.QUANTIZER})")
    if m.bits is None:
        raise UnsupportedModelError(f"layer {name}: QuantAct(bits=None) does not quantize - a float model")
    if not bool(m.initialized):
        raise UnsupportedModelError(f"layer {name}: QuantAct was never trained (its scale is uninitialised)")
    scale = float(m.scale.detach().float())
    if not (np.isfinite(scale) and scale > 0):
        raise UnsupportedModelError(f"layer {name}: QuantAct scale {scale} is not a positive finite number")
    return Act(qat.act_precision(m.bits, m.signed), scale)


def _product(name, m):
    cls = qat.QuantConv2d if isinstance(m, nn.Conv2d) else qat.QuantLinear
    if not _is_qat(m, cls) or type(m).forward is not cls.forward:
        raise UnsupportedModelError(f"layer {name}: {type(m).__name__} is not apnumba.layers.qat.{cls.__name__} "
                                    f"(quantizer {qat.QUANTIZER})")
    if m.weight_bits is None:
        raise UnsupportedModelError(f"layer {name}: weight_bits=None - its weights are not quantized")
    with torch.no_grad():
        codes, scale = m.quantized_weight()
    codes = codes.detach().cpu().numpy().astype(np.int32)
    scale = scale.detach().cpu().numpy().astype(np.float64)
    bias = None if m.bias is None else m.bias.detach().cpu().numpy().astype(np.float64)
    precision = qat.weight_precision(m.weight_bits)
    if cls is qat.QuantLinear:
        return Linear(m.in_features, m.out_features, bias is not None, weight_bits=precision).load(codes, scale, bias)
    if m.groups != 1 or _pair(name, "dilation", m.dilation) != 1 or m.padding_mode != "zeros":
        raise UnsupportedModelError(f"layer {name}: only groups=1, dilation=1, padding_mode='zeros' convolutions")
    if isinstance(m.padding, str):
        raise UnsupportedModelError(f"layer {name}: padding={m.padding!r}; give the padding as a number")
    k, stride, padding = (_pair(name, label, v) for label, v in
                          (("kernel_size", m.kernel_size), ("stride", m.stride), ("padding", m.padding)))
    layer = Conv2d(m.in_channels, m.out_channels, k, stride, padding, bias is not None, weight_bits=precision)
    return layer.load(codes.transpose(0, 2, 3, 1), scale, bias)  # (out, in, kh, kw) -> apnumba's (out, kh, kw, in)


def _batch_norm(name, m):
    if not m.track_running_stats or m.running_mean is None:
        raise UnsupportedModelError(f"layer {name}: batch norm without running statistics cannot be folded")
    bn = BatchNorm2d(m.num_features, float(m.eps))
    bn.running_mean = m.running_mean.detach().cpu().numpy().astype(np.float64)
    bn.running_var = m.running_var.detach().cpu().numpy().astype(np.float64)
    if m.affine:
        bn.weight = m.weight.detach().cpu().numpy().astype(np.float64)
        bn.bias = m.bias.detach().cpu().numpy().astype(np.float64)
    return bn


def _pool(name, m):
    if getattr(m, "ceil_mode", False) or getattr(m, "return_indices", False) or getattr(m, "divisor_override", None):
        raise UnsupportedModelError(f"layer {name}: ceil_mode, return_indices and divisor_override are not supported")
    if isinstance(m, nn.MaxPool2d) and _pair(name, "dilation", m.dilation) != 1:
        raise UnsupportedModelError(f"layer {name}: dilated pooling is not supported")
    if isinstance(m, nn.AvgPool2d) and not m.count_include_pad:
        raise UnsupportedModelError(f"layer {name}: AvgPool2d(count_include_pad=False) is not supported")
    k = _pair(name, "kernel_size", m.kernel_size)
    stride = _pair(name, "stride", m.stride if m.stride is not None else k)
    return k, stride, _pair(name, "padding", m.padding)


@dataclass
class _Walk:
    layers: list = field(default_factory=list)
    origin: dict = field(default_factory=dict)  # apnumba layer index -> torch module name holding its output
    act: object = None  # the quantizer of the tensor flowing now (None: float, straight out of a product)
    waiting: object = None  # a product / AvgPool2d whose output quantizer comes next


def from_torch(model, example=None, layout="NCHW"):
    """An apnumba ``Sequential`` (with ``input_act`` and, per layer, the torch module it came from) from a
    trained torch model built of ``apnumba.layers.qat`` modules; see the module doc for what maps to what.

    ``example``: a float batch of inputs (numpy or torch, ``layout``); when given, the import is checked by
    :func:`compare` and refused (QuantizerMismatch) if any integer activation differs beyond float ties."""
    if not isinstance(model, nn.Sequential):
        raise UnsupportedModelError(f"model: expected a torch.nn.Sequential, got {type(model).__name__}")
    leaves = [(n, m) for n, m in _leaves(model) if not isinstance(m, (nn.Dropout, nn.Identity))]
    if not leaves or not isinstance(leaves[0][1], qat.QuantAct):
        raise UnsupportedModelError("model: the first layer must be a QuantAct (it quantizes the network's input)")
    w = _Walk()
    input_act = w.act = _act(*leaves[0])
    for name, m in leaves[1:]:
        kind = type(m).__name__
        prev = w.layers[-1] if w.layers else None
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if w.act is None:
                raise UnsupportedModelError(f"layer {name} ({kind}): its input is not quantized - put a QuantAct "
                                            "before it")
            w.layers.append(_product(name, m))
            w.act, w.waiting = None, w.layers[-1]
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if not isinstance(prev, (Conv2d, Linear)) or w.act is not None:
                raise UnsupportedModelError(f"layer {name} ({kind}): batch norm must come right after a "
                                            "QuantConv2d / QuantLinear (it is folded into it)")
            w.layers.append(_batch_norm(name, m))
        elif isinstance(m, nn.ReLU):
            if not isinstance(prev, (Conv2d, Linear, BatchNorm2d)) or w.act is not None:
                raise UnsupportedModelError(f"layer {name} (ReLU): must follow a QuantConv2d / QuantLinear or its "
                                            "batch norm, before the QuantAct")
            w.layers.append(ReLU())
        elif isinstance(m, qat.QuantAct):
            if w.waiting is None:
                raise UnsupportedModelError(f"layer {name} (QuantAct): two quantizers in a row (requantizing "
                                            "quantized values) is not supported")
            w.waiting.out_act = w.act = _act(name, m)
            w.waiting = None
            # The codes are the output of the pool when one came between (product -> MaxPool -> QuantAct).
            w.origin[len(w.layers) - 1 if isinstance(prev, MaxPool2d) else _index_of_product(w.layers)] = name
        elif isinstance(m, nn.MaxPool2d):
            if w.act is None and not isinstance(prev, (Conv2d, Linear, BatchNorm2d, ReLU)):
                raise UnsupportedModelError(f"layer {name} (MaxPool2d): its input is not quantized")
            w.layers.append(MaxPool2d(*_pool(name, m)))
            w.origin[len(w.layers) - 1] = name
        elif isinstance(m, nn.AvgPool2d):
            if w.act is None:
                raise UnsupportedModelError(f"layer {name} (AvgPool2d): put the QuantAct before the pooling; "
                                            "another QuantAct after it gives the pooled codes")
            w.layers.append(AvgPool2d(*_pool(name, m)))
            w.act, w.waiting = None, w.layers[-1]
        elif isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1) or w.act is None:
                raise UnsupportedModelError(f"layer {name} (Flatten): only Flatten(1, -1) of quantized activations")
            w.layers.append(Flatten())
            w.origin[len(w.layers) - 1] = name
        else:
            raise UnsupportedModelError(f"layer {name} ({kind}): not supported by the importer (supported: QuantAct, "
                                        "QuantConv2d, QuantLinear, BatchNorm2d/1d, ReLU, MaxPool2d, AvgPool2d, "
                                        "Flatten, Dropout, Identity)")
    last = w.layers[-1] if w.layers else None
    if not isinstance(w.waiting, (Conv2d, Linear)) or isinstance(last, ReLU):
        raise UnsupportedModelError("model: must end with a QuantConv2d / QuantLinear (optionally batch norm) whose "
                                    "float output is the logits - no ReLU, pooling or QuantAct after it")
    w.origin[_index_of_product(w.layers)] = leaves[-1][0]
    out = Sequential(*w.layers)
    out.input_act = input_act
    out.torch_origin = w.origin
    out.precisions = "imported from torch (apnumba.layers.qat, " + qat.QUANTIZER + ")"
    if example is not None:
        report = compare(model, out, example, layout)
        if not report.consistent:
            raise QuantizerMismatch(report.first_problem())
    return out


def _index_of_product(layers):
    return max(i for i, m in enumerate(layers) if isinstance(m, (Conv2d, Linear, AvgPool2d)))


@dataclass
class StepComparison:
    step: str  # the apnumba step
    torch_layer: str  # the torch module whose output it is
    values: int  # codes compared
    differ: int  # codes that differ
    max_code_difference: int
    near_ties: int  # torch values of this step's quantizer within float rounding of a tie


@dataclass
class Comparison:
    steps: list
    logits_max_abs_difference: float
    logits_max_abs: float
    predictions_agree: int
    images: int

    @property
    def consistent(self):
        """True when every differing code is explainable by float rounding at a tie: the first step that
        differs has no more differences than near-tie values, each by one code (later steps inherit them)."""
        for s in self.steps:
            if s.differ:
                return s.max_code_difference <= 1 and s.differ <= s.near_ties
        return True

    def first_problem(self):
        for s in self.steps:
            if s.differ:
                return (f"step {s.step} (torch layer {s.torch_layer}): {s.differ} of {s.values} integer activations "
                        f"differ (by up to {s.max_code_difference}), only {s.near_ties} of torch's values sit at a "
                        "rounding tie - the model's quantizers do not behave as apnumba.layers.qat documents")
        return "no differences"

    def table(self):
        rows = [f"{'step':36} {'torch layer':14} {'codes':>10} {'differ':>7} {'near ties':>9}"]
        rows += [f"{s.step:36} {s.torch_layer:14} {s.values:10d} {s.differ:7d} {s.near_ties:9d}" for s in self.steps]
        rows.append(f"logits: max |difference| {self.logits_max_abs_difference:.3g} (max |logit| "
                    f"{self.logits_max_abs:.3g}); predictions agree on {self.predictions_agree} of {self.images}")
        return "\n".join(rows)


def compare(torch_model, model, x, layout="NCHW", tie_window=2e-5):
    """Run (a CPU float32 copy of) the torch model in eval mode and ``model`` (apnumba's numpy twin of its GPU plan) on
    images ``x`` and compare every step's integer activations, the logits and the predictions.  A torch
    value v (in code units) counts as near a tie when |frac(v) - 0.5| < tie_window * max(1, |v|): about
    a hundred float32 ulps, far more than the two quantizers' rounding can differ by."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = x.astype(np.float32)
    origin = getattr(model, "torch_origin", None)
    if origin is None:
        raise ValueError("model: compare needs a model made by from_torch (it maps steps to torch layers)")
    net = Network(model, x.shape, layout=layout, device="cpu")
    logits, steps = net.reference(x, intermediates=True)
    # On the CPU in float32, whatever the model was trained on: a GPU's TF32 convolutions would round more.
    torch_model = copy.deepcopy(torch_model).cpu().float()
    modules = dict(_leaves(torch_model))
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].detach(), output.detach())
        return hook

    for n, m in modules.items():  # hooks on the copy: nothing to remove afterwards
        m.register_forward_hook(keep(n))
    with torch.no_grad():
        xt = torch.from_numpy(x if layout == "NCHW" else x.transpose(0, 3, 1, 2).copy())
        torch_logits = torch_model.eval()(xt).numpy()
    names = list(modules)
    rows = []
    for step_name, got in steps[:-1]:  # the last step's logits are compared below
        last = int(step_name.split("+")[-1].split(":")[0])
        torch_name = origin.get(last)
        if torch_name is None or "Flatten" in step_name or "(input " in step_name:
            continue
        _, out = seen[torch_name]
        quantizer = next(n for n in reversed(names[: names.index(torch_name) + 1]) if isinstance(modules[n], qat.QuantAct))
        module, (inp, _) = modules[quantizer], seen[quantizer]
        act = model.layers[last].out_act if hasattr(model.layers[last], "out_act") else None
        if act is None:  # a MaxPool2d on codes: the values are codes times the flowing scale
            act = _flowing_act(model, last)
        codes = np.rint(out.numpy() / np.float32(act.scale)).astype(np.int64)
        expect = codes.transpose(0, 2, 3, 1) if codes.ndim == 4 else codes.reshape(got.shape)
        got = np.asarray(got).reshape(expect.shape)
        diff = np.abs(got.astype(np.int64) - expect)
        ties = 0
        if isinstance(module, qat.QuantAct) and not (module.signed and module.bits == 1):
            v = inp.numpy() / np.float32(act.scale)
            ties = int((np.abs(v % 1.0 - 0.5) < tie_window * np.maximum(1.0, np.abs(v))).sum())
        rows.append(StepComparison(step_name, torch_name, int(diff.size), int((diff > 0).sum()), int(diff.max(initial=0)),
                                   ties))
    agree = int((logits.argmax(axis=1) == torch_logits.argmax(axis=1)).sum())
    return Comparison(rows, float(np.abs(logits - torch_logits).max()), float(np.abs(torch_logits).max()), agree,
                      x.shape[0])


def _flowing_act(model, index):
    for m in reversed(model.layers[:index]):
        act = getattr(m, "out_act", None)
        if act is not None:
            return act
    return model.input_act
