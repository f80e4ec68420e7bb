"""CPU: layer objects and the model suite (shapes, precisions, argument checks); planning runs on a GPU or the simulator."""

import numpy as np
import pytest

from apnumba.layers import Act, BasicBlock, BatchNorm2d, Conv2d, Linear, MaxPool2d
from apnumba.layers.models import MODELS, alexnet, resnet18, vgg_variant


def test_model_suite_has_the_true_shapes():
    vgg = vgg_variant("w1a2")
    convs = [m for m in vgg.layers if isinstance(m, Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 96), (96, 256), (256, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    assert [lin.in_features for lin in vgg.layers if isinstance(lin, Linear)] == [25088, 4096, 4096]
    a = alexnet("w2a2")
    first = a.layers[0]
    assert (first.kernel_size, first.stride, first.padding) == (11, 4, 2)
    assert sum(isinstance(m, Conv2d) for m in a.layers) == 5 and sum(isinstance(m, Linear) for m in a.layers) == 3
    r = resnet18("w1a2")
    blocks = [m for m in r.layers if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and sum(b.downsample is not None for b in blocks) == 3
    assert (r.layers[0].kernel_size, r.layers[0].stride) == (7, 2)
    assert set(MODELS) == {"alexnet", "vgg", "resnet18"}


@pytest.mark.parametrize("convention", [False, True])
def test_edge_layers_default_to_8_bits_unless_apnn_convention(convention):
    m = resnet18("w1a2", apnn_convention=convention)
    first, last = m.layers[0], m.layers[-1]
    hidden = [m_ for m_ in m.layers if isinstance(m_, BasicBlock)][0].conv1
    assert hidden.weight_precision.bits == 1
    expect = 1 if convention else 8
    assert first.weight_precision.bits == expect and last.weight_precision.bits == expect
    assert ("APNN-TC" in m.precisions) == convention


def test_weights_are_codes_of_their_precision():
    for bits in ("w1a2", "w2a2", "wb1ab1"):
        conv = [m for m in vgg_variant(bits).layers if isinstance(m, Conv2d)][1]
        conv.weight_precision.check_codes(conv.weight, "weight")  # raises if any code is out of range


def test_bad_arguments_say_which_and_what():
    with pytest.raises(ValueError, match="kernel_size"):
        Conv2d(3, 8, 0)
    with pytest.raises(ValueError, match="stride"):
        Conv2d(3, 8, 3, stride=0)
    with pytest.raises(ValueError, match="scale"):
        Act("u2", -1.0)
    lin = Linear(4, 3, weight_bits="s2")
    with pytest.raises(ValueError, match="codes: expected shape"):
        lin.load(np.zeros((3, 5), np.int32), 0.1)
    with pytest.raises(ValueError):
        lin.load(np.full((3, 4), 7, np.int32), 0.1)  # 7 is not a 2-bit signed code


def test_batch_norm_folds_into_scale_and_shift():
    bn = BatchNorm2d(3)
    bn.weight, bn.bias = np.array([1.0, 2.0, 0.5]), np.array([0.0, 1.0, -1.0])
    bn.running_mean, bn.running_var = np.array([1.0, 0.0, 2.0]), np.array([4.0, 1.0, 0.25])
    g, h = bn.fold()
    y = np.array([3.0, -1.0, 5.0])
    torch_style = bn.weight * (y - bn.running_mean) / np.sqrt(bn.running_var + bn.eps) + bn.bias
    assert np.allclose(g * y + h, torch_style)
    assert MaxPool2d(3, 2, 1).stride == 2 and MaxPool2d(2).stride == 2


def _same_model(a, b):
    from apnumba.layers import Sequential

    assert type(a) is type(b)
    if isinstance(a, Sequential):
        assert len(a.layers) == len(b.layers)
        for x, y in zip(a.layers, b.layers):
            _same_model(x, y)
        return
    if isinstance(a, BasicBlock):
        for name in ("conv1", "bn1", "conv2", "bn2"):
            _same_model(getattr(a, name), getattr(b, name))
        assert (a.downsample is None) == (b.downsample is None)
        if a.downsample is not None:
            _same_model(a.downsample, b.downsample)
        return
    for name, v in vars(a).items():
        w = getattr(b, name)
        if isinstance(v, np.ndarray):
            assert v.dtype == w.dtype and v.shape == w.shape and (v == w).all(), name
        else:
            assert v == w, name


@pytest.mark.parametrize("build,bits", [("tiny_resnet", "w2a2"), ("tiny_vgg", "wb1ab1"), ("resnet18", "w1a2")])
def test_save_and_load_round_trip(tmp_path, build, bits):
    from apnumba.layers import io, models

    model = getattr(models, build)(bits)
    path = tmp_path / "model.npz"
    io.save(model, path)
    _same_model(model, io.load(path))
    assert path.stat().st_size < 2 * 1024 * 1024 or build == "resnet18"  # packed: p bits a weight


def test_load_refuses_other_files_and_versions(tmp_path):
    import json

    from apnumba.layers import io
    from apnumba.layers.models import tiny_vgg

    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(io.ModelFileError, match="not an apnumba model"):
        io.load(tmp_path / "plain.npz")
    io.save(tiny_vgg(), tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        arrays = {k: f[k] for k in f.files}
    spec = json.loads(bytes(arrays["__spec__"]).decode())
    spec["version"] = io.VERSION + 1
    arrays["__spec__"] = np.frombuffer(json.dumps(spec).encode(), np.uint8)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(io.ModelFileError, match=f"version {io.VERSION + 1}"):
        io.load(tmp_path / "future.npz")
