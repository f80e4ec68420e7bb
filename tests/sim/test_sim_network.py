"""A toy network end to end in the simulator: planner, fused epilogues, pooling, flatten, the float32 logits."""

from apnumba.layers.models import tiny_vgg

from tests.conftest import requires_simulator
from tests.helpers import check_network

pytestmark = requires_simulator


def test_tiny_vgg_matches_its_numpy_twin(rng):
    check_network(rng, tiny_vgg("w2a2"), (1, 3, 8, 8))
