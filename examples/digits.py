"""A real model on real data: scikit-learn's handwritten digits, trained with quantization-aware training in
torch (apnumba.layers.qat), imported into apnumba, and checked image by image against the fake-quant model.

    pip install -e '.[examples]'        # torch + scikit-learn
    python examples/digits.py           # trains fp32, then w1a2 and w2a2 QAT (CPU, about a minute each)
    python examples/digits.py --bits w2a2 --epochs 10 --device cpu

1,797 8x8 images (pixel values 0..16), 80/20 split (1,437 train, 360 test, stratified, seed 0).  The CNN:
input quantizer (8-bit signed) - conv 3x3 1->32 (8-bit weights) - BN - ReLU - QuantAct(a) - conv 3x3 32->64
(w bits) - BN - ReLU - QuantAct(a) - maxpool 2 - conv 3x3 64->64 (w bits) - BN - ReLU - QuantAct(a) -
maxpool 2 - flatten - linear 256->10 (8-bit weights).  First and last layers keep 8-bit weights (the usual
convention); "w1" means +-1 weights, "a2" unsigned 2-bit activations.  The QAT models start from the
trained fp32 weights and fine-tune.

apnumba runs the model on the GPU when there is one (``--device cuda``), else through the numpy twin of
the same plan (``--device cpu``: what the GPU computes, bit for bit).
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apnumba.layers import qat  # noqa: E402


def load_data(seed=0):
    """(x_train, y_train, x_test, y_test): float32 NCHW images in [-1, 1], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target.astype(np.int64), test_size=0.2,
                                                        random_state=seed, stratify=digits.target)
    return x_train, y_train, x_test, y_test


def parse_bits(bits):
    """"w1a2" -> (1, 2); None -> (None, None): the float model."""
    if bits is None:
        return None, None
    w, a = bits.lower().lstrip("w").split("a")
    return int(w), int(a)


def digits_cnn(bits=None):
    w, a = parse_bits(bits)
    edge = None if bits is None else 8  # first and last layers' weight bits

    def block(cin, cout, weight_bits, pool):
        layers = [qat.QuantConv2d(cin, cout, 3, padding=1, bias=False, weight_bits=weight_bits), nn.BatchNorm2d(cout),
                  nn.ReLU(), qat.QuantAct(a)]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(
        qat.QuantAct(edge, signed=True),
        *block(1, 32, edge, False),
        *block(32, 64, w, True),
        *block(64, 64, w, True),
        nn.Flatten(),
        qat.QuantLinear(256, 10, weight_bits=edge),
    )


def train(model, x, y, epochs, lr=2e-3, seed=0, batch=64):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def torch_predictions(model, x):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).argmax(1).numpy()


def qat_from(float_model, bits):
    """A QAT model with the float model's trained weights (the quantizer scales start untrained)."""
    model = digits_cnn(bits)
    model.load_state_dict(copy.deepcopy(float_model.state_dict()), strict=False)
    return model


def run_apnumba(model, x, device):
    """apnumba's logits for images x: on the GPU (checked equal to the numpy twin) or the numpy twin itself."""
    from apnumba.layers import Network

    if device == "cuda":
        net = Network(model, x.shape)
        logits = net.forward(x).copy_to_host()
        assert (logits == net.reference(x)).all(), "GPU logits differ from the numpy twin"
        return logits
    return Network(model, x.shape, device="cpu").forward(x)


def main(argv=None):
    from apnumba.device import gpu_available
    from apnumba.layers import from_torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", nargs="+", default=["w1a2", "w2a2"])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if gpu_available() else "cpu")
    ap.add_argument("--save", metavar="DIR", help="save each imported model as DIR/digits-<bits>.npz")
    args = ap.parse_args(argv)
    x_train, y_train, x_test, y_test = load_data()
    agree_everywhere = True
    t0 = time.time()
    fp32 = train(digits_cnn(None), x_train, y_train, args.epochs)
    acc = (torch_predictions(fp32, x_test) == y_test).mean()
    print(f"fp32                 test accuracy {acc:.2%}   ({time.time() - t0:.0f} s to train)")
    for bits in args.bits:
        t0 = time.time()
        model = train(qat_from(fp32, bits), x_train, y_train, args.epochs, lr=5e-4)
        fq = torch_predictions(model, x_test)
        imported = from_torch(model, example=x_test)  # refuses the model if any code differs beyond float ties
        logits = run_apnumba(imported, x_test, args.device)
        ours = logits.argmax(1)
        agree_everywhere &= bool((ours == fq).all())
        print(f"{bits} fake-quant      test accuracy {(fq == y_test).mean():.2%}   ({time.time() - t0:.0f} s to train)")
        print(f"{bits} apnumba ({args.device}) test accuracy {(ours == y_test).mean():.2%}   predictions equal to "
              f"the fake-quant model's on {(ours == fq).sum()} of {len(fq)} test images")
        if args.save:
            from apnumba.layers import save

            Path(args.save).mkdir(parents=True, exist_ok=True)
            save(imported, Path(args.save) / f"digits-{bits}.npz")
    return 0 if agree_everywhere else 1


if __name__ == "__main__":
    sys.exit(main())
