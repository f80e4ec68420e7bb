"""The model suite with true shapes: AlexNet, APNN-TC's VGG-variant, ResNet-18 - and toy versions for tests.

``bits`` ("w1a2", "w2a2", "wb1ab1"...) sets the hidden layers.  The first layer's weights and the
last layer's weights and input default to 8 bits (``edge_bits``), as quantized networks usually keep
them; ``apnn_convention=True`` quantizes every layer at ``bits``, as APNN-TC's measurements did.
Weights are random (seeded) with He-like scales, and activation scales are set so that codes spread
over their range; speed does not depend on the values, and correctness is checked against
``Network.reference`` on the same weights.
"""

from ..precision import Encoding, Precision, parse_wa
from .modules import Act, AvgPool2d, BasicBlock, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential


def _act(precision):
    p = Precision.parse(precision)
    if p.encoding is Encoding.BINARY:
        return Act(p, 1.0)
    return Act(p, 3.0 / p.hi if p.encoding is Encoding.UNSIGNED else 3.0 / max(p.hi, 1))


class _Bits:
    def __init__(self, bits, edge_bits, apnn_convention):
        self.w, self.a = parse_wa(bits)
        edge = self.w if apnn_convention else Precision(edge_bits, "signed")
        self.first_w = edge
        self.last_w = edge
        self.last_in = _act(self.a if apnn_convention else Precision(edge_bits, "unsigned"))
        self.hidden = _act(self.a)
        self.describe = f"hidden {bits}, first/last layers " + ("the same (APNN-TC convention)" if apnn_convention
                                                                  else f"{edge_bits}-bit")

    def sequential(self, *layers):
        """The model, with a line saying its precisions (every report quotes it)."""
        model = Sequential(*layers)
        model.precisions = self.describe
        return model


def alexnet(bits="w1a2", num_classes=1000, edge_bits=8, apnn_convention=False):
    """torchvision's AlexNet shapes (224x224 input): 11x11/4 stem, 5x5, three 3x3, three FC."""
    b = _Bits(bits, edge_bits, apnn_convention)
    h = b.hidden
    return b.sequential(
        Conv2d(3, 64, 11, 4, 2, weight_bits=b.first_w, out_act=h, seed=1), BatchNorm2d(64), ReLU(), MaxPool2d(3, 2),
        Conv2d(64, 192, 5, 1, 2, weight_bits=b.w, out_act=h, seed=2), BatchNorm2d(192), ReLU(), MaxPool2d(3, 2),
        Conv2d(192, 384, 3, 1, 1, weight_bits=b.w, out_act=h, seed=3), BatchNorm2d(384), ReLU(),
        Conv2d(384, 256, 3, 1, 1, weight_bits=b.w, out_act=h, seed=4), BatchNorm2d(256), ReLU(),
        Conv2d(256, 256, 3, 1, 1, weight_bits=b.w, out_act=h, seed=5), BatchNorm2d(256), ReLU(), MaxPool2d(3, 2),
        Flatten(),
        Linear(256 * 6 * 6, 4096, weight_bits=b.w, out_act=h, seed=6), ReLU(),
        Linear(4096, 4096, weight_bits=b.w, out_act=b.last_in, seed=7), ReLU(),
        Linear(4096, num_classes, weight_bits=b.last_w, seed=8),
    )


def vgg_variant(bits="w1a2", num_classes=1000, edge_bits=8, apnn_convention=False):
    """APNN-TC's VGG-variant: conv 3->96, 96->256, 256x2, 256->512, 512x2, 512x3 (3x3, 2x2 pools), FC 25088-4096-4096-1000."""
    b = _Bits(bits, edge_bits, apnn_convention)
    h = b.hidden
    layers = []
    plan = [(3, 96), "M", (96, 256), "M", (256, 256), (256, 256), "M", (256, 512), (512, 512), (512, 512), "M",
            (512, 512), (512, 512), (512, 512), "M"]
    for i, item in enumerate(plan):
        if item == "M":
            layers.append(MaxPool2d(2, 2))
            continue
        cin, cout = item
        layers += [Conv2d(cin, cout, 3, 1, 1, weight_bits=b.first_w if i == 0 else b.w, out_act=h, seed=10 + i),
                   BatchNorm2d(cout), ReLU()]
    layers += [Flatten(),
               Linear(512 * 7 * 7, 4096, weight_bits=b.w, out_act=h, seed=40), ReLU(),
               Linear(4096, 4096, weight_bits=b.w, out_act=b.last_in, seed=41), ReLU(),
               Linear(4096, num_classes, weight_bits=b.last_w, seed=42)]
    return b.sequential(*layers)


def resnet18(bits="w1a2", num_classes=1000, edge_bits=8, apnn_convention=False):
    """ResNet-18 (224x224): 7x7/2 stem, 3x3/2 max pool, four stages of two basic blocks, global average pool, FC."""
    b = _Bits(bits, edge_bits, apnn_convention)
    h = b.hidden
    layers = [Conv2d(3, 64, 7, 2, 3, bias=False, weight_bits=b.first_w, out_act=h, seed=50), BatchNorm2d(64), ReLU(),
              MaxPool2d(3, 2, 1)]
    cin, seed = 64, 60
    for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            layers.append(BasicBlock(cin, planes, stride if block == 0 else 1, weight_bits=b.w, act=h, seed=seed))
            cin, seed = planes, seed + 3
    layers += [AvgPool2d(7, out_act=b.last_in), Flatten(), Linear(512, num_classes, weight_bits=b.last_w, seed=90)]
    return b.sequential(*layers)


def tiny_resnet(bits="w1a2", num_classes=10, edge_bits=8, apnn_convention=False):
    """A ResNet in miniature (16x16 input) for tests: every kind of step the big ones have."""
    b = _Bits(bits, edge_bits, apnn_convention)
    h = b.hidden
    return b.sequential(
        Conv2d(3, 32, 3, 1, 1, bias=False, weight_bits=b.first_w, out_act=h, seed=1), BatchNorm2d(32), ReLU(),
        MaxPool2d(2, 2),
        BasicBlock(32, 32, 1, weight_bits=b.w, act=h, seed=2),
        BasicBlock(32, 64, 2, weight_bits=b.w, act=h, seed=5),
        AvgPool2d(4, out_act=b.last_in), Flatten(),
        Linear(64, num_classes, weight_bits=b.last_w, seed=9),
    )


def tiny_vgg(bits="w1a2", num_classes=10, edge_bits=8, apnn_convention=False):
    """A VGG in miniature (8x8 input) for tests: convolutions, max pools, flatten, a hidden FC."""
    b = _Bits(bits, edge_bits, apnn_convention)
    h = b.hidden
    return b.sequential(
        Conv2d(3, 32, 3, 1, 1, weight_bits=b.first_w, out_act=h, seed=1), BatchNorm2d(32), ReLU(), MaxPool2d(2, 2),
        Conv2d(32, 64, 3, 1, 1, weight_bits=b.w, out_act=h, seed=2), BatchNorm2d(64), ReLU(), MaxPool2d(2, 2),
        Flatten(),
        Linear(64 * 2 * 2, 32, weight_bits=b.w, out_act=b.last_in, seed=3), ReLU(),
        Linear(32, num_classes, weight_bits=b.last_w, seed=4),
    )


MODELS = {"alexnet": (alexnet, 224), "vgg": (vgg_variant, 224), "resnet18": (resnet18, 224)}
