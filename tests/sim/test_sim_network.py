"""A toy network end to end in the simulator: planner, fused epilogues, pooling, flatten, the float32 logits."""

import numpy as np

from apnumba.kernels.apmm import TileConfig
from apnumba.layers.models import tiny_resnet, tiny_vgg

from tests.conftest import requires_simulator
from tests.helpers import check_network

pytestmark = requires_simulator


def test_tiny_vgg_matches_its_numpy_twin(rng):
    net = check_network(rng, tiny_vgg("w2a2"), (1, 3, 8, 8))
    # the 8-bit last layer runs on int8: the hidden Linear before it writes code bytes
    assert [s.src.packing for s in net.steps[-2:]] == ["bits", "bytes"]
    assert "int8" in net.describe()[-1][2]


def test_tiny_resnet_row_sums_stay_exact_pass_after_pass(rng):
    """Row sums that several blocks add into - 64-channel convs in 32-row tiles, the global average pool -
    are zeroed before each pass adds into them again: a second pass is exact too (+-1 weights: every
    product reads its input's row sums; check_network compares every step's row sums as well)."""
    net = check_network(rng, tiny_resnet("wb1a2"), (1, 3, 16, 16), tile=TileConfig(2, 1, 1, 1, 2))
    assert any(s.run.config.block_m < s.out.K for s in net.steps if hasattr(s.run, "config"))  # blocks share pixels
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert (net.forward(x).copy_to_host() == net.reference(x)).all()
