"""Save and load a model (a Sequential of apnumba layers) in one ``.npz`` file.

Weights are stored packed - the bit planes of ``reference.pack``, p bits a weight - beside their
per-channel scales, biases, batch-norm statistics and every activation quantizer; the layer structure is
a JSON document in the same file.  Loading checks the format name and version first and refuses a file
it does not understand, naming what it found.
"""

import json

import numpy as np

from .. import reference
from .modules import Act, AvgPool2d, BasicBlock, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential

FORMAT = "apnumba-model"
VERSION = 1


class ModelFileError(ValueError):
    """The file is not an apnumba model this version can read."""


def _act(a):
    return None if a is None else {"precision": str(a.precision), "scale": float(a.scale), "zero_point": int(a.zero_point)}


def _unact(d):
    return None if d is None else Act(d["precision"], d["scale"], d["zero_point"])


def _encode(layer, key, arrays):
    """A JSON-able description of ``layer``; its arrays go into ``arrays`` under names starting with ``key``."""
    kind = type(layer).__name__
    if isinstance(layer, (Conv2d, Linear)):
        codes = layer.weight.reshape(layer.out_channels, -1)
        arrays[f"{key}.weight_words"] = reference.pack(codes, layer.weight_precision)
        arrays[f"{key}.weight_scale"] = np.asarray(layer.weight_scale, np.float64)
        if layer.bias is not None:
            arrays[f"{key}.bias"] = np.asarray(layer.bias, np.float64)
        d = {"type": kind, "weight_bits": str(layer.weight_precision), "weight_shape": list(layer.weight.shape),
             "bias": layer.bias is not None, "out_act": _act(layer.out_act)}
        if isinstance(layer, Conv2d):
            d.update(in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=layer.kernel_size,
                     stride=layer.stride, padding=layer.padding)
        else:
            d.update(in_features=layer.in_features, out_features=layer.out_channels)
        return d
    if isinstance(layer, BatchNorm2d):
        for name in ("weight", "bias", "running_mean", "running_var"):
            arrays[f"{key}.{name}"] = np.asarray(getattr(layer, name), np.float64)
        return {"type": kind, "num_features": layer.num_features, "eps": layer.eps}
    if isinstance(layer, (MaxPool2d, AvgPool2d)):
        d = {"type": kind, "kernel_size": layer.kernel_size, "stride": layer.stride, "padding": layer.padding}
        if isinstance(layer, AvgPool2d):
            d["out_act"] = _act(layer.out_act)
        return d
    if isinstance(layer, (ReLU, Flatten)):
        return {"type": kind}
    if isinstance(layer, BasicBlock):
        parts = {"conv1": layer.conv1, "bn1": layer.bn1, "conv2": layer.conv2, "bn2": layer.bn2}
        d = {"type": kind, **{name: _encode(m, f"{key}.{name}", arrays) for name, m in parts.items()}}
        d["downsample"] = None if layer.downsample is None else _encode(layer.downsample, f"{key}.downsample", arrays)
        return d
    if isinstance(layer, Sequential):
        return {"type": kind, "layers": [_encode(m, f"{key}.{i}", arrays) for i, m in enumerate(layer.layers)],
                "precisions": getattr(layer, "precisions", None), "input_act": _act(getattr(layer, "input_act", None))}
    raise TypeError(f"save: no file format for a {kind} layer ({key})")


def _decode(d, key, arrays):
    kind = d["type"]
    if kind in ("Conv2d", "Linear"):
        if kind == "Conv2d":
            layer = Conv2d(d["in_channels"], d["out_channels"], d["kernel_size"], d["stride"], d["padding"], d["bias"],
                           weight_bits=d["weight_bits"], out_act=_unact(d["out_act"]))
        else:
            layer = Linear(d["in_features"], d["out_features"], d["bias"], weight_bits=d["weight_bits"],
                           out_act=_unact(d["out_act"]))
        shape = tuple(d["weight_shape"])
        K = int(np.prod(shape[1:]))
        codes = reference.unpack(arrays[f"{key}.weight_words"], layer.weight_precision, K).reshape(shape)
        return layer.load(codes, arrays[f"{key}.weight_scale"], arrays[f"{key}.bias"] if d["bias"] else None)
    if kind == "BatchNorm2d":
        bn = BatchNorm2d(d["num_features"], d["eps"])
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(bn, name, np.array(arrays[f"{key}.{name}"]))
        return bn
    if kind == "MaxPool2d":
        return MaxPool2d(d["kernel_size"], d["stride"], d["padding"])
    if kind == "AvgPool2d":
        return AvgPool2d(d["kernel_size"], d["stride"], d["padding"], out_act=_unact(d["out_act"]))
    if kind == "ReLU":
        return ReLU()
    if kind == "Flatten":
        return Flatten()
    if kind == "BasicBlock":
        block = BasicBlock.__new__(BasicBlock)
        for name in ("conv1", "bn1", "conv2", "bn2"):
            setattr(block, name, _decode(d[name], f"{key}.{name}", arrays))
        block.downsample = None if d["downsample"] is None else _decode(d["downsample"], f"{key}.downsample", arrays)
        return block
    if kind == "Sequential":
        model = Sequential(*[_decode(m, f"{key}.{i}", arrays) for i, m in enumerate(d["layers"])])
        if d.get("precisions") is not None:
            model.precisions = d["precisions"]
        if d.get("input_act") is not None:  # an imported model's input quantizer
            model.input_act = _unact(d["input_act"])
        return model
    raise ModelFileError(f"load: unknown layer type {kind!r} at {key}")


def save(model, path):
    """Write ``model`` (a Sequential) to ``path`` (.npz): packed weights, scales, statistics, structure."""
    if not isinstance(model, Sequential):
        raise TypeError(f"model: expected a Sequential, got {type(model).__name__}")
    arrays = {}
    spec = {"format": FORMAT, "version": VERSION, "model": _encode(model, "m", arrays)}
    np.savez(path, __spec__=np.frombuffer(json.dumps(spec).encode(), np.uint8), **arrays)


def load(path):
    """Read a model written by :func:`save`; refuses other files and other format versions."""
    with np.load(path, allow_pickle=False) as f:
        if "__spec__" not in f.files:
            raise ModelFileError(f"{path}: not an apnumba model file (no '__spec__' entry)")
        spec = json.loads(bytes(f["__spec__"]).decode())
        if spec.get("format") != FORMAT:
            raise ModelFileError(f"{path}: format {spec.get('format')!r}, expected {FORMAT!r}")
        if spec.get("version") != VERSION:
            raise ModelFileError(f"{path}: format version {spec.get('version')}, this apnumba reads version {VERSION}")
        arrays = {k: f[k] for k in f.files if k != "__spec__"}
    return _decode(spec["model"], "m", arrays)
