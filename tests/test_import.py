"""CPU: the QAT modules' quantizers, the torch importer, and the digits example (torch and scikit-learn are
optional: these tests skip without them)."""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from apnumba.layers import Network, load, save  # noqa: E402
from apnumba.layers import qat  # noqa: E402
from apnumba.layers.importer import QuantizerMismatch, UnsupportedModelError, compare, from_torch  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ---------------------------------------------------------------- the quantizers, as documented

@pytest.mark.parametrize("bits", range(1, 9))
def test_weight_quantizer_is_the_documented_one(bits):
    w = torch.randn(5, 3, 3, 3) * torch.linspace(0.1, 3, 5)[:, None, None, None]
    w[2] = 0  # a channel of zeros
    codes, scale = qat.weight_codes(w, bits)
    flat = w.reshape(5, -1).double()
    if bits == 1:
        assert set(codes.unique().tolist()) <= {-1.0, 1.0}
        assert torch.allclose(scale.double(), flat.abs().mean(1))
        assert (codes.reshape(5, -1) == torch.where(flat >= 0, 1.0, -1.0)).all()
    else:
        qmax = 2 ** (bits - 1) - 1
        expect_scale = torch.where(flat.abs().amax(1) > 0, flat.abs().amax(1) / qmax, torch.ones(5, dtype=torch.float64))
        assert torch.allclose(scale.double(), expect_scale)
        assert codes.abs().max() <= qmax and (codes == codes.round()).all()
        # round half to even of w / s, in float32
        expect = torch.clamp(torch.round(w.reshape(5, -1) / scale[:, None]), -qmax, qmax)
        assert (codes.reshape(5, -1) == expect).all()
        assert codes[0].abs().max() == qmax  # the largest weight of a channel gets the largest code
    assert qat.weight_precision(bits) == ("b1" if bits == 1 else f"s{bits}")


def test_activation_quantizer_rounds_half_to_even_and_clamps():
    q = qat.QuantAct(2, scale=0.5)
    x = torch.tensor([-1.0, 0.2, 0.25, 0.75, 1.25, 1.4, 9.0])
    assert q.codes(x).tolist() == [0, 0, 0, 2, 2, 3, 3]  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half to even)
    assert (q.eval()(x) == q.codes(x) * 0.5).all()
    s = qat.QuantAct(3, signed=True, scale=1.0)
    assert s.codes(torch.tensor([-9.0, -3.5, 3.5, 9.0])).tolist() == [-4, -4, 3, 3]
    b = qat.QuantAct(1, signed=True, scale=0.25)
    assert b.codes(torch.tensor([-0.1, 0.0, 2.0])).tolist() == [-1, 1, 1]
    assert qat.act_precision(1, True) == "b1" and qat.act_precision(2, False) == "u2" and qat.act_precision(4, True) == "s4"
    with pytest.raises(ValueError, match="bits"):
        qat.QuantAct(9)
    with pytest.raises(ValueError, match="weight_bits"):
        qat.QuantConv2d(1, 1, 3, weight_bits=0)


def test_quantizers_train_straight_through_and_init_their_scale():
    q = qat.QuantAct(2)
    x = (torch.rand(64, 8) * 4).requires_grad_()
    y = q.train()(x)
    assert bool(q.initialized) and abs(float(q.scale.detach()) - 2 * float(x.detach().abs().mean()) / 3**0.5) < 1e-6
    y.sum().backward()
    assert x.grad is not None and q.scale.grad is not None and float(x.grad.abs().sum()) > 0
    conv = qat.QuantConv2d(2, 3, 3, weight_bits=2)
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------- the importer

def small_cnn(w_bits=2, a_bits=2, pool_first=False):
    act = [qat.QuantAct(a_bits)]
    pool = [nn.MaxPool2d(2)]
    return nn.Sequential(
        qat.QuantAct(8, signed=True),
        qat.QuantConv2d(3, 16, 3, padding=1, bias=False, weight_bits=8), nn.BatchNorm2d(16), nn.ReLU(),
        *((pool + act) if pool_first else (act + pool)),
        nn.Sequential(qat.QuantConv2d(16, 24, 3, stride=1, padding=1, weight_bits=w_bits), nn.BatchNorm2d(24), nn.ReLU(),
                      qat.QuantAct(a_bits)),
        nn.MaxPool2d(3, 2, 1),
        nn.Dropout(0.1),
        nn.Flatten(),
        qat.QuantLinear(24 * 3 * 3, 32, weight_bits=w_bits), nn.BatchNorm1d(32), nn.ReLU(), qat.QuantAct(a_bits),
        qat.QuantLinear(32, 10, weight_bits=8),
    )


def trained(model, steps=30, seed=0, shape=(16, 3, 11, 11)):
    """A few optimiser steps on random data: weights, BN statistics and scales all move off their inits."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.randn(*shape)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (shape[0],)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("w_bits,a_bits,pool_first", [(2, 2, False), (1, 2, True), (4, 3, False), (1, 1, False)])
def test_import_matches_the_fake_quant_model(w_bits, a_bits, pool_first):
    torch.manual_seed(1)
    model = trained(small_cnn(w_bits, a_bits, pool_first))
    x = np.random.default_rng(2).standard_normal((24, 3, 11, 11)).astype(np.float32)
    imported = from_torch(model, example=x)
    report = compare(model, imported, x)
    assert report.consistent and len(report.steps) >= 3
    assert all(s.differ == 0 for s in report.steps), report.table()  # every integer activation equal
    assert report.logits_max_abs_difference <= 1e-4 * max(1.0, report.logits_max_abs), report.table()
    assert report.predictions_agree == 24
    assert imported.input_act.precision.bits == 8 and str(imported.layers[0].weight_precision) == "s8"
    hidden = [m for m in imported.layers if hasattr(m, "weight_precision")][1]
    assert hidden.weight_precision.bits == w_bits


def test_import_survives_save_and_load(tmp_path):
    model = trained(small_cnn())
    x = np.random.default_rng(3).standard_normal((4, 3, 11, 11)).astype(np.float32)
    imported = from_torch(model)
    save(imported, tmp_path / "m.npz")
    back = load(tmp_path / "m.npz")
    assert back.input_act == imported.input_act
    a = Network(imported, x.shape, device="cpu").forward(x)
    assert (Network(back, x.shape, device="cpu").forward(x) == a).all()


def test_a_different_quantizer_is_refused():
    model = trained(small_cnn())
    x = np.random.default_rng(4).standard_normal((16, 3, 11, 11)).astype(np.float32)

    class FloorAct(qat.QuantAct):  # a subclass may quantize differently: refused by its type
        def forward(self, x):
            return torch.clamp(torch.floor(x / self.scale), *self.range) * self.scale

    swapped = FloorAct(2)
    swapped.load_state_dict(model[4].state_dict())
    bad = nn.Sequential(*list(model)[:4], swapped, *list(model)[5:])
    with pytest.raises(UnsupportedModelError, match="layer 4: FloorAct is not apnumba.layers.qat.QuantAct"):
        from_torch(bad)
    # The same floor rounding patched onto an instance: only the numbers tell - the example catches it.
    patched = trained(small_cnn())
    quant = patched[4]
    quant.forward = lambda t: torch.clamp(torch.floor(t / quant.scale), *quant.range) * quant.scale
    with pytest.raises(QuantizerMismatch, match="do not behave as apnumba.layers.qat documents"):
        from_torch(patched, example=x)
    from_torch(model, example=x)  # the untouched model imports


@pytest.mark.parametrize("surgery,message", [
    (lambda m: nn.Sequential(*list(m)[1:]), "first layer must be a QuantAct"),
    (lambda m: nn.Sequential(*list(m)[:5], nn.Sigmoid(), *list(m)[5:]), r"layer 5 \(Sigmoid\): not supported"),
    (lambda m: nn.Sequential(*list(m), nn.ReLU()), "must end with .* no ReLU"),
    (lambda m: nn.Sequential(*list(m)[:4], nn.ReLU(), *list(m)[4:]), "must follow a QuantConv2d"),
    (lambda m: nn.Sequential(*list(m), qat.QuantAct(2, scale=1.0)), "must end with"),
    (lambda m: nn.Sequential(m[0], nn.Conv2d(3, 16, 3), *list(m)[2:]), "is not apnumba.layers.qat.QuantConv2d"),
    (lambda m: nn.Sequential(*list(m)[:1], *list(m)[2:]), "batch norm must come right after"),
    (lambda m: nn.Sequential(*list(m)[:4], *list(m)[5:]), "its input is not quantized"),
    (lambda m: nn.Sequential(*list(m)[:4], qat.QuantAct(2), *list(m)[5:]), "never trained"),
])
def test_unsupported_models_are_refused_with_the_layer_named(surgery, message):
    model = trained(small_cnn())
    with pytest.raises(UnsupportedModelError, match=message):
        from_torch(surgery(model))


def test_unsupported_settings_are_refused():
    grouped = nn.Sequential(qat.QuantAct(8, signed=True, scale=0.1), qat.QuantConv2d(4, 4, 3, weight_bits=2))
    grouped[1].groups = 2
    with pytest.raises(UnsupportedModelError, match="groups=1"):
        from_torch(grouped)
    ceil = nn.Sequential(qat.QuantAct(8, signed=True, scale=0.1), nn.MaxPool2d(2, ceil_mode=True))
    with pytest.raises(UnsupportedModelError, match="ceil_mode"):
        from_torch(ceil)
    with pytest.raises(UnsupportedModelError, match="Sequential"):
        from_torch(qat.QuantConv2d(4, 4, 3))
    floaty = nn.Sequential(qat.QuantAct(None), qat.QuantConv2d(3, 4, 3, weight_bits=None))
    with pytest.raises(UnsupportedModelError, match="does not quantize"):
        from_torch(floaty)


# ---------------------------------------------------------------- the worked example, shortened

def test_digits_example_apnumba_predicts_what_the_fake_quant_model_predicts():
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import digits
    finally:
        sys.path.remove(str(EXAMPLES))
    x_train, y_train, x_test, y_test = digits.load_data()
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    fp32 = digits.train(digits.digits_cnn(None), x_train, y_train, epochs=3)
    assert (digits.torch_predictions(fp32, x_test) == y_test).mean() > 0.9
    for bits in ("w1a2", "w2a2"):
        model = digits.train(digits.qat_from(fp32, bits), x_train, y_train, epochs=2, lr=5e-4)
        fake_quant = digits.torch_predictions(model, x_test)
        imported = from_torch(model, example=x_test)
        report = compare(model, imported, x_test)
        assert all(s.differ == 0 for s in report.steps), report.table()
        ours = digits.run_apnumba(imported, x_test, "cpu").argmax(1)
        assert (ours == fake_quant).all()
        assert (ours == y_test).mean() > 0.85
