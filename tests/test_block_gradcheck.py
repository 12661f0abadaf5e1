"""gradcheck (float64, finite differences) of the efficient block with
respect to its input and every parameter."""

import pytest
import torch
from torch.func import functional_call

from conftest import make_pair


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-bottleneck", "recompute"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.4], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("bn_size", [2, 0], ids=["bottleneck", "plain"])
@pytest.mark.parametrize("spatial", [(3, 3), (1, 1), (1, 1, 1)], ids=["3x3", "one-pixel", "one-voxel"])
def test_gradcheck_efficient_block(training, recompute, drop_rate, bn_size, spatial):
    if bn_size == 0 and recompute:
        pytest.skip("plain layers have no bottleneck to recompute")
    block, _ = make_pair(
        2, 3, 2, bn_size=bn_size, drop_rate=drop_rate, recompute_bottleneck=recompute, spatial_dims=len(spatial))
    block.train(training)
    names = [name for name, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())
    x = torch.randn(2, 3, *spatial, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        torch.manual_seed(0)  # the same dropout mask at every evaluation
        return functional_call(block, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))
