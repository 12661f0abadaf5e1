"""Shared helpers: matched pairs of our block and the reference oracle, and
the comparisons the parity tests make."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import densenet_efficient as de
from densenet_efficient.reference import ReferenceDenseBlock

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# A test's "device" parameter: the CPU, and CUDA where a GPU is (marked cuda: the GPU check runs those).
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]


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
        if isinstance(m, _BatchNorm):
            with torch.no_grad():
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def set_momentum(module: nn.Module, momentum: float | None) -> None:
    for m in module.modules():
        if isinstance(m, _BatchNorm):
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
    spatial_dims: int = 2,
) -> tuple[de.DenseBlock, ReferenceDenseBlock]:
    """Our block and the reference with identical parameters and buffers."""
    torch.manual_seed(seed)
    ours = de.DenseBlock(
        num_layers, num_input_features, growth_rate, bn_size, drop_rate,
        mode=mode, recompute_bottleneck=recompute_bottleneck, spatial_dims=spatial_dims,
    )
    randomize_norms(ours, torch.Generator().manual_seed(seed + 1))
    reference = ReferenceDenseBlock(
        num_layers, num_input_features, bn_size, growth_rate, drop_rate, spatial_dims=spatial_dims
    )
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


def smallest_relu_input(block: nn.Module, x: torch.Tensor) -> float:
    """The smallest |BatchNorm output| (a ReLU's input) in a forward pass of
    a copy of `block` (a reference block, whose modules run one by one). A
    float32 model rounds values closer to zero than that onto either side of
    the ReLU, which moves a gradient by a whole dy: a comparison of float32
    errors holds only for inputs that keep every ReLU input well off zero."""
    import copy

    block = copy.deepcopy(block)
    found = []
    for m in block.modules():
        if isinstance(m, _BatchNorm):
            m.register_forward_hook(lambda module, args, out: found.append(out.detach().abs().min().item()))
    with torch.no_grad():
        block(x)
    return min(found)


def assert_results_close(ours: dict, expected: dict, tol: float, zero: float | None = None) -> None:
    """Every result within `tol` relative error; with `zero`, a result may
    instead be within `zero` absolutely (whole models: a gradient that is zero
    but for rounding, as the norm0 bias's before batch-statistics norms)."""
    assert ours.keys() == expected.keys()
    for name in expected:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(ours[name], expected[name]), name
            continue
        err = rel_error(ours[name], expected[name])
        if zero is not None and err > tol and (ours[name] - expected[name]).abs().max() <= zero:
            continue
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


def block_forward_arguments(
    block, input, dropout_p=0.0, recompute=False, save_for_backward=True, dropout_whole_channels=False
) -> dict:
    """dense_block_forward's arguments by name for `block` (in its train/eval
    state) on `input`, as functional.dense_block passes them."""
    layers = list(block.values())
    bottleneck = hasattr(layers[0], "conv2")
    args = {"input": input}
    for prefix in ("norm1", "norm2"):
        norms = [getattr(layer, prefix) for layer in layers if prefix == "norm1" or bottleneck]
        args[f"{prefix}_weight"] = [n.weight for n in norms]
        args[f"{prefix}_bias"] = [n.bias for n in norms]
        for stat in ("running_mean", "running_var"):
            args[f"{prefix}_{stat}"] = [None if n.training else getattr(n, stat) for n in norms]
        args[f"{prefix}_eps"] = [n.eps for n in norms]
    args["conv1_weight"] = [layer.conv1.weight for layer in layers]
    args["conv2_weight"] = [layer.conv2.weight for layer in layers if bottleneck]
    args.update(dropout_p=dropout_p, dropout_whole_channels=dropout_whole_channels, recompute_bottleneck=recompute,
                save_for_backward=save_for_backward, sync_group="")
    return args


def positional(op, args: dict) -> tuple:
    """`args` (by name) in the order of `op`'s schema."""
    from densenet_efficient._ops import argument_names

    return tuple(args[name] for name in argument_names(op))


def opcheck_block_backward(forward_args: dict) -> None:
    """opcheck of dense_block_backward on what dense_block_forward gives for `forward_args`."""
    from densenet_efficient._ops import ops, result_names

    forward, backward = ops.dense_block_forward.default, ops.dense_block_backward.default
    with torch.no_grad():
        results = dict(zip(result_names(forward), forward(*positional(forward, forward_args))))
    detached = {n: [t.detach() if isinstance(t, torch.Tensor) else t for t in v] if isinstance(v, list) else v
                for n, v in forward_args.items()}
    backward_args = {**detached, **results, "grad_output": torch.randn_like(results["output"])}
    torch.library.opcheck(backward, positional(backward, backward_args))
