"""How many operators an efficient dense block runs per layer, measured with
``torch.profiler``: on a GPU each compute operator is at least one kernel
launch, and at CIFAR sizes a step is launch-bound.

``operators_per_layer`` profiles one forward + backward of two blocks that
differ only in depth and divides the difference by the difference in layers,
so per-block costs (allocating the buffers, the running-statistics update)
drop out. It reports:

* ``compute``: operators that compute something, convolutions and GEMMs
  aside: the innermost non-view, non-allocation operators (a composite such
  as ``aten::zeros`` counts as the ``zero_`` it runs), with everything inside
  a convolution or a matrix product left out (that is cuDNN's, cuBLAS's or
  oneDNN's business; the 1×1 convolutions run as batched GEMMs);
* ``dispatcher``: every operator call the dispatcher records, views,
  allocations and library internals included;
* ``by_name``: the compute operators per layer by name.
"""

from __future__ import annotations

import collections

import torch

__all__ = ["operators_per_layer", "host_synchronizations"]

# Operators that only allocate or make views: no kernel runs.
_NOT_COMPUTE = frozenset(
    "aten::" + name
    for name in (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "as_strided",
        "as_strided_", "slice", "narrow", "select", "view", "reshape", "expand", "unsqueeze", "squeeze",
        "t", "transpose", "permute", "detach", "alias", "contiguous", "to", "lift_fresh", "unbind", "split",
        "chunk", "_reshape_alias", "set_",
    )
)
# Reading a device value on the host: a synchronisation.
_HOST_READS = frozenset({"aten::item", "aten::_local_scalar_dense"})


def _is_dispatcher_op(name: str) -> bool:
    return "::" in name and not name.startswith(("autograd::", "torch::autograd"))


_MATRIX_PRODUCTS = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul"})


def _is_library_kernel(name: str) -> bool:
    """A convolution or a matrix product."""
    return "convolution" in name or name.startswith("aten::conv") or name in _MATRIX_PRODUCTS


def _compute_leaves(event, found: collections.Counter) -> bool:
    """Counts the innermost compute operators under `event`; returns whether
    there was any."""
    if _is_library_kernel(event.name):
        return True  # the library's, not counted here
    below = False
    for child in event.cpu_children:
        below |= _compute_leaves(child, found)
    is_compute = _is_dispatcher_op(event.name) and event.name not in _NOT_COMPUTE
    if is_compute and not below:
        found[event.name] += 1
    return below or is_compute


def _profile_step(num_layers: int, momentum: float | None, recompute_bottleneck: bool):
    from .modules import DenseBlock

    torch.manual_seed(0)
    block = DenseBlock(num_layers, 16, 8, mode="efficient", recompute_bottleneck=recompute_bottleneck)
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    grad = torch.randn(4, 16 + 8 * num_layers, 8, 8)
    block(x).backward(grad)  # warm-up
    block.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        block(x).backward(grad)
    return profile.events()


def _counts(events):
    compute = collections.Counter()
    for event in events:
        if event.cpu_parent is None:
            _compute_leaves(event, compute)
    dispatcher = sum(1 for e in events if _is_dispatcher_op(e.name))
    return compute, dispatcher


def operators_per_layer(
    momentum: float | None = 0.1, recompute_bottleneck: bool = False, depths: tuple[int, int] = (8, 16)
) -> dict:
    """Operators per layer of one training step (forward + backward) of an
    efficient DenseNet-BC block on the CPU (see the module docstring)."""
    (shallow, deep) = depths
    compute_a, dispatcher_a = _counts(_profile_step(shallow, momentum, recompute_bottleneck))
    compute_b, dispatcher_b = _counts(_profile_step(deep, momentum, recompute_bottleneck))
    layers = deep - shallow
    by_name = {
        name: (compute_b[name] - compute_a[name]) / layers
        for name in compute_a.keys() | compute_b.keys()
        if compute_b[name] != compute_a[name]
    }
    return {
        "compute": sum(by_name.values()),
        "dispatcher": (dispatcher_b - dispatcher_a) / layers,
        "by_name": dict(sorted(by_name.items(), key=lambda item: -item[1])),
    }


def host_synchronizations(step) -> list[str]:
    """The operators in `step()` that read a tensor's value on the host."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    return [e.name for e in profile.events() if e.name in _HOST_READS]
