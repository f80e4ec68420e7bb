"""A toy network end to end in the simulator: planner, fused epilogues, pooling, flatten, the float32 logits."""

from apnumba.layers.models import tiny_vgg

from tests.conftest import requires_simulator
from tests.helpers import check_network

pytestmark = requires_simulator


def test_tiny_vgg_matches_its_numpy_twin(rng):
    net = check_network(rng, tiny_vgg("w2a2"), (1, 3, 8, 8))
    # the 8-bit last layer runs on int8: the hidden Linear before it writes code bytes
    assert [s.src.packing for s in net.steps[-2:]] == ["bits", "bytes"]
    assert "int8" in net.describe()[-1][2]
