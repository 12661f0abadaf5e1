"""Shared helpers: matched pairs of our block and the reference oracle, and
the comparisons the parity tests make."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import densenet_efficient as de
from densenet_efficient.reference import ReferenceDenseBlock

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def one_rank_world():
    """A default process group of this process alone (gloo), for the duration of a test."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def randomize_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics, so a test
    cannot pass with an identity BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def set_momentum(module: nn.Module, momentum: float | None) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum


def make_pair(
    num_layers: int,
    num_input_features: int,
    growth_rate: int,
    bn_size: int = 4,
    drop_rate: float = 0.0,
    dtype: torch.dtype = torch.float64,
    momentum: float | None = 0.1,
    recompute_bottleneck: bool = False,
    mode: str = "efficient",
    seed: int = 0,
) -> tuple[de.DenseBlock, ReferenceDenseBlock]:
    """Our block and the reference with identical parameters and buffers."""
    torch.manual_seed(seed)
    ours = de.DenseBlock(
        num_layers, num_input_features, growth_rate, bn_size, drop_rate,
        mode=mode, recompute_bottleneck=recompute_bottleneck,
    )
    randomize_norms(ours, torch.Generator().manual_seed(seed + 1))
    reference = ReferenceDenseBlock(num_layers, num_input_features, bn_size, growth_rate, drop_rate)
    reference.load_state_dict(ours.state_dict())
    set_momentum(ours, momentum)
    set_momentum(reference, momentum)
    return ours.to(dtype), reference.to(dtype)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    denominator = e.norm().item()
    difference = (a - e).norm().item()
    if denominator == 0:
        return difference
    return difference / denominator


def step_results(block: nn.Module, x: torch.Tensor, grad_output: torch.Tensor, seed: int = 1234) -> dict:
    """One forward/backward; returns output, input gradient, parameter
    gradients and buffers by name."""
    x = x.detach().clone().requires_grad_()
    for p in block.parameters():
        p.grad = None
    torch.manual_seed(seed)  # identical dropout masks for both blocks
    out = block(x)
    out.backward(grad_output)
    results = {"output": out.detach(), "input.grad": x.grad}
    results.update({f"{n}.grad": p.grad for n, p in block.named_parameters()})
    results.update({n: b.detach().clone() for n, b in block.named_buffers()})
    return results


def assert_results_close(ours: dict, expected: dict, tol: float) -> None:
    assert ours.keys() == expected.keys()
    for name in expected:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(ours[name], expected[name]), name
            continue
        err = rel_error(ours[name], expected[name])
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"
