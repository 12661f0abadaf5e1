"""The stretches of a DenseNet outside its dense blocks as single operators
that keep only their input for backward (csrc/norm_relu_pool.cpp):

* ``transition``: BatchNorm-ReLU-Conv1×1-AvgPool2×2, pooled before the
  convolution (they commute): the BatchNorm-ReLU output and the convolution
  output are never kept, and the convolution runs at a quarter of the pixels;
* ``stem``: the stem's conv0-BatchNorm-ReLU-MaxPool, keeping only the image
  (conv0's output, the largest activation of an ImageNet DenseNet, is
  computed again in backward, and the max positions found again).

Each computes what its modules compute (BatchNorm as ``nn.BatchNorm{1,2,3}d``
does: batch or running statistics, running statistics updated once per
training call, autocast), within float rounding. ``transition_fusable`` and
``stem_fusable`` say whether modules have the one layout these operators
compute."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._ops import ops
from .build_info import require_kernels_for
from .functional import _uses_batch_stats, autocast_dtype
from .reference import AVG_POOL, BATCH_NORM, CONV, MAX_POOL, per_dim

__all__ = ["runs_fused", "stem", "stem_fusable", "transition", "transition_fusable"]

def _spatial_dims_of_norm(norm: nn.Module) -> int | None:
    return next((dims for dims, kind in BATCH_NORM.items() if type(norm) is kind and norm.affine), None)


def transition_fusable(transition: nn.Module) -> bool:
    """Whether `transition` holds exactly norm (BatchNorm, affine), relu
    (ReLU), conv (1×1, stride 1, no bias) and pool (average, 2, stride 2) of
    one spatial rank."""
    parts = dict(transition.named_children())
    if list(parts) != ["norm", "relu", "conv", "pool"]:
        return False
    dims = _spatial_dims_of_norm(parts["norm"])
    conv, pool = parts["conv"], parts["pool"]
    return (
        dims is not None
        and _without_hooks(*parts.values())
        and type(parts["relu"]) is nn.ReLU
        and type(conv) is CONV[dims]
        and conv.kernel_size == (1,) * dims
        and conv.stride == (1,) * dims
        and conv.padding == (0,) * dims
        and conv.dilation == (1,) * dims
        and conv.groups == 1
        and conv.bias is None
        and type(pool) is AVG_POOL[dims]
        and per_dim(pool.kernel_size, dims) == (2,) * dims
        and per_dim(pool.stride, dims) == (2,) * dims
        and per_dim(pool.padding, dims) == (0,) * dims
        and not pool.ceil_mode
        and getattr(pool, "divisor_override", None) is None
    )


def stem_fusable(conv: nn.Module, norm: nn.Module, relu: nn.Module, pool: nn.Module) -> bool:
    """Whether (conv, norm, relu, pool) are a convolution (no bias, groups
    and dilation 1, zero padding), BatchNorm (affine), ReLU and a max pool
    (dilation 1, no ceil mode) of one spatial rank."""
    dims = _spatial_dims_of_norm(norm)
    return (
        dims is not None
        and _without_hooks(conv, norm, relu, pool)
        and type(conv) is CONV[dims]
        and conv.bias is None
        and conv.groups == 1
        and conv.dilation == (1,) * dims
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.out_channels == norm.num_features
        and type(relu) is nn.ReLU
        and type(pool) is MAX_POOL[dims]
        and per_dim(pool.dilation, dims) == (1,) * dims
        and not pool.ceil_mode
        and not pool.return_indices
    )


def _in_autocast_dtype(what: str, input: Tensor, conv_weight: Tensor) -> Tensor:
    """The input in the dtype autocast would run the convolution in. The
    operators cast a float32 conv weight to the input's dtype themselves, in
    forward and again in backward, so no low-precision copy of it is kept
    for backward. Outside autocast the convolution takes the input's dtype,
    as the modules' would."""
    compute_dtype = autocast_dtype(input)
    if compute_dtype is not None:
        return input.to(compute_dtype)
    if conv_weight.dtype != input.dtype:
        raise TypeError(
            f"{what}: the conv weight has dtype {conv_weight.dtype} but the input has dtype {input.dtype}; "
            "outside autocast (which leaves float64 alone) they must share it"
        )
    return input


def _running_stats(norm: nn.Module) -> list[Tensor]:
    return [] if _uses_batch_stats(norm) else [norm.running_mean, norm.running_var]


def _update_running_stats(norm: nn.Module, batch_mean: Tensor, batch_var: Tensor, count: Tensor) -> None:
    if norm.training and norm.track_running_stats:
        ops.update_running_stats(
            [norm.running_mean], [norm.running_var], [norm.num_batches_tracked],
            [None if norm.momentum is None else float(norm.momentum)], [0], batch_mean, batch_var, count,
        )


def _without_hooks(*modules: nn.Module) -> bool:
    """Fusing runs none of these modules' forwards, so no hook of theirs
    would run: none may have forward hooks (old-style weight_norm, say, is
    one) or backward hooks, and no global module hook may be registered."""
    from torch.nn.modules import module as module_hooks

    if any(
        getattr(module_hooks, name)
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                     "_global_backward_pre_hooks")
    ):
        return False
    return not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules
    )


def runs_fused(input: Tensor) -> bool:
    """Whether the fused operators compute what the modules would for this
    input: not under CPU autocast in 3-D, where PyTorch pools in float32
    (avg_pool3d and max_pool3d have no bfloat16 CPU kernels); the modules
    run one by one there."""
    return not (input.dim() == 5 and input.device.type == "cpu" and torch.is_autocast_enabled("cpu"))


def _check_input(what: str, input: Tensor, norm: nn.Module) -> None:
    dims = _spatial_dims_of_norm(norm)
    if input.dim() != 2 + dims or input.shape[1] != norm.num_features:
        raise ValueError(
            f"{what}: expected a {2 + dims}-D input with {norm.num_features} channels (its "
            f"{type(norm).__name__}), got shape {tuple(input.shape)}"
        )


def transition(input: Tensor, transition: nn.Module) -> Tensor:
    """``transition(input)`` (norm, relu, conv, pool; see
    ``transition_fusable``) as one operator that keeps only ``input``. Under
    autocast it runs in the autocast dtype (a dense block's output already is
    in it) with float32 BatchNorm parameters, as the modules would."""
    norm, conv = transition.norm, transition.conv
    _check_input("transition", input, norm)
    require_kernels_for(input.device)
    input = _in_autocast_dtype("transition", input, conv.weight)
    with torch.autocast(input.device.type, enabled=False):
        output, batch_mean, batch_var, count = ops.transition_forward(
            input, norm.weight, norm.bias, _running_stats(norm), float(norm.eps), conv.weight
        )
    _update_running_stats(norm, batch_mean, batch_var, count)
    return output


def stem(input: Tensor, conv: nn.Module, norm: nn.Module, pool: nn.Module) -> Tensor:
    """``pool(relu(norm(conv(input))))`` (see ``stem_fusable``) as one
    operator that keeps only ``input``. Under autocast the convolution runs
    in the autocast dtype, and so does the rest, as the modules would."""
    dims = input.dim() - 2
    if input.dim() != conv.weight.dim() or input.shape[1] != conv.in_channels:
        raise ValueError(
            f"stem: expected a {conv.weight.dim()}-D input with {conv.in_channels} channels (its "
            f"{type(conv).__name__}), got shape {tuple(input.shape)}"
        )
    require_kernels_for(input.device)
    input = _in_autocast_dtype("stem", input, conv.weight)
    kernel = per_dim(pool.kernel_size, dims)
    stride = per_dim(pool.stride if pool.stride is not None else pool.kernel_size, dims)
    with torch.autocast(input.device.type, enabled=False):
        output, batch_mean, batch_var, count = ops.stem_forward(
            input, conv.weight, list(conv.stride), list(conv.padding), norm.weight, norm.bias, _running_stats(norm),
            float(norm.eps), kernel, stride, per_dim(pool.padding, dims),
        )
    _update_running_stats(norm, batch_mean, batch_var, count)
    return output
