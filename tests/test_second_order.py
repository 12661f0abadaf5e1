"""Second-order gradients (backward with create_graph=True: gradient
penalties, R1, meta-learning). Efficient mode gives first-order gradients
only and says so, naming the modes that give second-order ones; naive and
checkpoint mode give them, equal to each other and to finite differences
(gradgradcheck) in float64."""

import copy

import pytest
import torch

from conftest import assert_results_close, make_pair
from densenet_efficient import models
from test_fused import _stem, _transition


def _gradient_penalty(module, x):
    """R1-style: the squared norm of d(sum of outputs)/dx, differentiated
    again with respect to the parameters."""
    x = x.detach().clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    return {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("stage", ["block", "transition", "stem", "model"])
def test_efficient_mode_refuses_second_order_naming_the_modes_that_give_it(stage):
    module, x = {
        "block": lambda: (make_pair(2, 3, 2)[0], torch.randn(2, 3, 4, 4, dtype=torch.float64)),
        "transition": lambda: (_transition(2), torch.randn(2, 6, 4, 4, dtype=torch.float64)),
        "stem": lambda: (_stem(2), torch.randn(2, 2, 9, 9, dtype=torch.float64)),
        "model": lambda: (models.densenet_bc(16, 4).double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)),
    }[stage]()
    with pytest.raises(RuntimeError, match=r"first-order gradients only.*mode='naive' or mode='checkpoint'"):
        _gradient_penalty(module, x)
    # First-order gradients, with and without a graph of the forward kept, are as ever.
    x = x.detach().clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(module(x).sum(), x)
    assert grad_x.shape == x.shape


def test_naive_and_checkpoint_second_order_gradients_agree():
    model = models.densenet_bc(16, 4, mode="naive").double()
    twin = copy.deepcopy(model)
    twin.mode = "checkpoint"
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    naive, checkpointed = _gradient_penalty(model, x), _gradient_penalty(twin, x)
    assert all(g is not None for g in naive.values())
    assert_results_close(checkpointed, naive, 1e-10)


@pytest.mark.parametrize("mode", ["naive", "checkpoint"])
def test_gradgradcheck(mode):
    block, _ = make_pair(2, 2, 2, bn_size=2, mode=mode)
    block.eval()  # running statistics: smooth in the input away from the ReLU kinks
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(block, (x,))
