"""CPU: layer objects and the model suite (shapes, precisions, argument checks); planning runs on a GPU or the simulator."""

import numpy as np
import pytest

from apnumba.layers import Act, BasicBlock, BatchNorm2d, Conv2d, Linear, MaxPool2d
from apnumba.precision import Precision
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


# ---------------------------------------------------------------- planning without a GPU (device="cpu")

def _float_twin(model, x, input_act):
    """The model in float64 on dequantized codes (torch's order of layers), quantizing where the plan does:
    an independent check of the planner's folding (the exact checks against the GPU are in tests/sim and
    test_gpu.py)."""
    from apnumba import reference
    from apnumba.layers import Flatten, ReLU
    from apnumba.precision import dequantize, quantize

    def q(t, act):  # quantize NCHW floats per tensor, back to floats
        codes = quantize(t.reshape(1, -1).astype(np.float32), act.precision, act.scale, act.zero_point)
        return dequantize(codes, act.precision, act.scale, act.zero_point).astype(np.float64).reshape(t.shape)

    t = q(x, input_act)
    layers = model.layers
    for i, layer in enumerate(layers):
        if isinstance(layer, Conv2d):
            w = layer.weight.astype(np.float64) * layer.weight_scale[:, None, None, None]  # (K, R, S, C)
            k, st, pad = layer.kernel_size, layer.stride, layer.padding
            xp = np.pad(t, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
            OH = reference.conv_output_size(t.shape[2], k, st, pad)
            OW = reference.conv_output_size(t.shape[3], k, st, pad)
            t = sum(np.einsum("nchw,kc->nkhw", xp[:, :, r : r + st * (OH - 1) + 1 : st, c : c + st * (OW - 1) + 1 : st],
                              w[:, r, c, :]) for r in range(k) for c in range(k))
            t = t + (layer.bias[None, :, None, None] if layer.bias is not None else 0)
        elif isinstance(layer, Linear):
            t = t @ (layer.weight * layer.weight_scale[:, None]).T + (layer.bias if layer.bias is not None else 0)
        elif isinstance(layer, BatchNorm2d):
            g, h = layer.fold()
            t = t * g[None, :, None, None] + h[None, :, None, None]
        elif isinstance(layer, ReLU):
            t = np.maximum(t, 0)
        elif isinstance(layer, MaxPool2d):
            N, C, H, W = t.shape
            t = t[:, :, : H // 2 * 2, : W // 2 * 2].reshape(N, C, H // 2, 2, W // 2, 2).max(axis=(3, 5))
        elif isinstance(layer, Flatten):
            t = t.reshape(t.shape[0], -1)
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        producer = [m for m in layers[: i + 1] if isinstance(m, (Conv2d, Linear))]
        if producer and producer[-1].out_act is not None and not isinstance(nxt, (BatchNorm2d, ReLU)) \
                and isinstance(layer, (Conv2d, Linear, BatchNorm2d, ReLU)):  # (max pooling commutes with it)
            t = q(t, producer[-1].out_act)
    return t


def test_a_cpu_plan_runs_without_a_gpu_and_follows_the_float_model():
    from apnumba.layers import Network
    from apnumba.layers.models import tiny_vgg

    rng = np.random.default_rng(3)
    model = tiny_vgg("w2a2")
    for m in model.layers:
        if isinstance(m, BatchNorm2d):  # non-trivial batch norm statistics
            m.weight, m.bias = rng.uniform(0.5, 2, m.num_features), rng.uniform(-1, 1, m.num_features)
            m.running_mean, m.running_var = rng.uniform(-1, 1, m.num_features), rng.uniform(0.5, 2, m.num_features)
    net = Network(model, (4, 3, 8, 8), device="cpu")
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    logits = net.forward(x)
    assert logits.shape == (4, 10) and logits.dtype == np.float32
    twin = _float_twin(model, x, net.input_act)
    # float32 folded constants vs float64: a code could flip at a rounding tie (not for this seed: every code
    # agrees, and the logits differ by float32 rounding only).
    assert np.abs(logits - twin).max() < 1e-5 * np.abs(twin).max(), (logits, twin)
    _, steps = net.reference(x, intermediates=True)
    assert [name for name, _ in steps] == [s.name for s in net.steps]


def test_an_8bit_last_layer_reads_code_bytes():
    """A product whose next layer runs cheaper on int8 (8-bit weights and inputs) packs its output as code
    bytes; hidden layers stay bit planes; a last layer fed by a pool (ResNet) or at the hidden precision
    (APNN-TC's convention) too."""
    from apnumba.layers import Network

    net = Network(alexnet("w1a2"), (1, 3, 224, 224), device="cpu")
    assert [s.src.packing for s in net.steps if "Linear" in s.name] == ["bits", "bits", "bytes"]
    assert net.describe()[-1][2] == "int8"
    assert net.steps[-1].src.precision == Precision.parse("u8")
    for model in (resnet18("w1a2"), alexnet("w1a2", apnn_convention=True)):
        net = Network(model, (1, 3, 224, 224), device="cpu")
        assert all(s.src.packing == "bits" for s in net.steps[2:]), [(s.name, s.src.packing) for s in net.steps]


def test_downsamples_run_beside_the_first_conv():
    """A BasicBlock's downsample conv is planned first, on the side stream (it needs only the block's input),
    and its block's conv2 - the one that reads the shortcut - joins it; nothing else leaves the main stream."""
    from apnumba.layers import Network

    net = Network(resnet18("w1a2"), (1, 3, 224, 224), device="cpu")
    names = [s.name for s in net.steps]
    side = [i for i, s in enumerate(net.steps) if s.side]
    assert [names[i] for i in side] == [n for n in names if n.endswith(".downsample")] and len(side) == 3
    for i in side:
        block = names[i].rsplit(".", 1)[0]
        assert names[i + 1:i + 3] == [f"{block}.conv1", f"{block}.conv2"]
        assert net.steps[i].src is net.steps[i + 1].src  # both read the block's input
        assert net.steps[i + 2].join and not net.steps[i + 1].join
    assert sum(s.join for s in net.steps) == 3


def test_a_cpu_plan_checks_like_a_gpu_plan():
    from apnumba.layers import Flatten, Network, PlanError, Sequential

    with pytest.raises(PlanError, match="input channels"):
        Network(Sequential(Conv2d(3, 4, 3), Flatten(), Linear(4, 2)), (1, 5, 3, 3), device="cpu")
    with pytest.raises(PlanError, match="Flatten first"):
        Network(Sequential(Conv2d(3, 4, 3, out_act=Act("u2", 0.5)), Linear(4, 2)), (1, 3, 5, 5), device="cpu")
    with pytest.raises(PlanError, match="flatten"):  # +-1 activations cannot keep zero padding bits
        Network(Sequential(Conv2d(3, 4, 3, out_act=Act("b1", 1.0)), Flatten(), Linear(4, 2)), (1, 3, 3, 3),
                device="cpu")
    with pytest.raises(ValueError, match="device"):
        Network(Sequential(Conv2d(3, 4, 3)), (1, 3, 3, 3), device="gpu")
    net = Network(Sequential(Conv2d(3, 4, 3, out_act=Act("u2", 0.5)), Flatten(), Linear(4, 2)), (1, 3, 3, 3),
                  device="cpu")
    with pytest.raises(ValueError, match="x: expected shape"):
        net.forward(np.zeros((1, 3, 3, 4), np.float32))
    with pytest.raises(RuntimeError, match="device='cpu'"):
        net.capture()
