"""The efficient dense block as a function of its layer modules.

``dense_block(input, layers)`` computes exactly what torchvision's
``_DenseBlock`` computes for those layers (output = input and every layer's new
features, concatenated), with memory linear in depth: see docs/design.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from torch.nn.modules.batchnorm import _BatchNorm

from ._ops import FORWARD_RESULTS, block_statistics_size, ops
from .build_info import require_kernels_for
from .reference import BATCH_NORM, CONV

__all__ = ["check_block_input", "dense_block", "spatial_dims_of"]

_LAYOUTS = {1: "[N, C, L]", 2: "[N, C, H, W]", 3: "[N, C, D, H, W]"}


def _named_layers(layers: Mapping[str, nn.Module] | Iterable[nn.Module]) -> list[tuple[str, nn.Module]]:
    if hasattr(layers, "items"):
        return list(layers.items())
    return [(f"layer{i + 1}", layer) for i, layer in enumerate(layers)]


def _uses_batch_stats(norm: _BatchNorm) -> bool:
    # torch.nn.functional.batch_norm's rule.
    return norm.training or norm.running_mean is None


def _updates_running_stats(norm: _BatchNorm) -> bool:
    return norm.training and norm.track_running_stats


def spatial_dims_of(layer: nn.Module) -> int | None:
    """The spatial rank of a dense layer: that of its conv1 (Conv1d, Conv2d
    or Conv3d), or None when conv1 is none of them."""
    conv = getattr(layer, "conv1", None)
    return next((dims for dims, kind in CONV.items() if type(conv) is kind), None)


def _check_conv(name: str, conv: nn.Module, kernel: int, spatial_dims: int) -> None:
    padding = (kernel - 1) // 2
    ok = (
        type(conv) is CONV[spatial_dims]
        and conv.kernel_size == (kernel,) * spatial_dims
        and conv.stride == (1,) * spatial_dims
        and conv.padding == (padding,) * spatial_dims
        and conv.dilation == (1,) * spatial_dims
        and conv.groups == 1
        and conv.bias is None
        and conv.padding_mode == "zeros"
    )
    if not ok:
        raise ValueError(
            f"efficient mode needs {name} to be nn.{CONV[spatial_dims].__name__}(kernel_size={kernel}, "
            f"stride=1, padding={padding}, bias=False); got {conv!r}"
        )


def _has_bottleneck(layer: nn.Module) -> bool:
    return getattr(layer, "conv2", None) is not None


def _check_layer(name: str, layer: nn.Module, bottleneck: bool, spatial_dims: int | None = None) -> None:
    """Raises ValueError unless `layer` is a dense layer efficient mode runs
    exactly, with convolutions of `spatial_dims` (default: its conv1's)."""
    if spatial_dims is None:
        spatial_dims = spatial_dims_of(layer)
        if spatial_dims is None:
            raise ValueError(
                f"efficient mode needs {name}.conv1 to be nn.Conv1d, nn.Conv2d or nn.Conv3d; "
                f"got {getattr(layer, 'conv1', None)!r}"
            )
    if _has_bottleneck(layer) != bottleneck:
        raise ValueError(
            f"efficient mode needs all layers of a block alike: {name} "
            f"{'has' if _has_bottleneck(layer) else 'lacks'} the bottleneck (norm2, relu2, conv2) "
            "that the first layer " + ("has" if bottleneck else "lacks")
        )
    norm_type = BATCH_NORM[spatial_dims]
    for norm_name in ("norm1", "norm2") if bottleneck else ("norm1",):
        norm = getattr(layer, norm_name, None)
        if type(norm) is not norm_type or not norm.affine:
            raise ValueError(
                f"efficient mode supports {name}.{norm_name} = nn.{norm_type.__name__}(affine=True) "
                f"(track_running_stats and momentum may be anything); got {norm!r}"
            )
    for relu_name in ("relu1", "relu2") if bottleneck else ("relu1",):
        relu = getattr(layer, relu_name, None)
        if type(relu) is not nn.ReLU:
            raise ValueError(f"efficient mode needs {name}.{relu_name} to be nn.ReLU; got {relu!r}")
    if bottleneck:
        _check_conv(f"{name}.conv1", getattr(layer, "conv1", None), 1, spatial_dims)
        _check_conv(f"{name}.conv2", getattr(layer, "conv2", None), 3, spatial_dims)
    else:
        _check_conv(f"{name}.conv1", getattr(layer, "conv1", None), 3, spatial_dims)


def autocast_dtype(input: Tensor) -> torch.dtype | None:
    """The dtype autocast would run this block's convolutions in, or None.
    Like autocast, it leaves float64 alone."""
    device_type = input.device.type
    if input.dtype == torch.float64:
        return None
    # Devices without autocast (meta, say) would make is_autocast_enabled
    # raise. Under torch.compile the input is on a device our kernels run on
    # (CPU, CUDA: both have autocast), and the check is skipped: torch 2.11's
    # dynamo cannot trace it.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def check_block_input(input: Tensor, layers: Mapping[str, nn.Module] | Iterable[nn.Module]) -> None:
    """Rejects a block input that cannot be right, before any state changes."""
    _check_input(input, _named_layers(layers))


def _check_input(input: Tensor, named: list[tuple[str, nn.Module]]) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"dense block: expected a Tensor input, got {type(input).__name__}")
    if not named:
        raise ValueError("dense block: a dense block needs at least one layer")
    first = named[0][1]
    spatial_dims = first.conv1.weight.dim() - 2
    if input.dim() != 2 + spatial_dims:
        raise ValueError(
            f"dense block: expected a {2 + spatial_dims}-D input {_LAYOUTS.get(spatial_dims, '')} "
            f"(the layers' convolutions are {type(first.conv1).__name__}), got a {input.dim()}-D "
            f"tensor of shape {tuple(input.shape)}"
        )
    expected_channels = first.conv1.in_channels
    if input.shape[1] != expected_channels:
        raise ValueError(
            f"dense block: expected an input with {expected_channels} channels "
            f"(num_input_features), got {input.shape[1]} (input shape {tuple(input.shape)})"
        )
    weight = first.conv1.weight
    if autocast_dtype(input) is None:
        # Outside autocast the convolutions take the input's dtype, as naive
        # mode's would (the operator also takes float32 weights beside
        # half/bfloat16 maps, for autocast).
        if input.dtype != weight.dtype:
            raise TypeError(
                f"dense block: expected input of dtype {weight.dtype} (the parameters' dtype), "
                f"got {input.dtype}"
            )
        for name, layer in named:
            for conv in ("conv1", "conv2"):
                conv_weight = getattr(getattr(layer, conv, None), "weight", None)
                if conv_weight is not None and conv_weight.dtype != input.dtype:
                    raise TypeError(
                        f"dense block: {name}.{conv}.weight has dtype {conv_weight.dtype} but the input "
                        f"has dtype {input.dtype}; outside autocast they must share it"
                    )
    if input.device != weight.device:
        raise RuntimeError(
            f"dense block: expected all tensors on the same device: the input is on "
            f"{input.device}, the parameters on {weight.device}"
        )
    uses_batch_stats = any(
        _uses_batch_stats(norm)
        for _, layer in named
        for norm in (getattr(layer, "norm1", None), getattr(layer, "norm2", None))
        if isinstance(norm, _BatchNorm)
    )
    if uses_batch_stats and input.numel() == input.shape[1]:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.shape}"
        )


def _drops_whole_channels(layer: nn.Module) -> bool:
    """Whether a layer's dropout draws per sample and channel (F.dropout2d/3d,
    as MONAI's layers do) rather than per value (F.dropout, torchvision's)."""
    return bool(getattr(layer, "drops_whole_channels", False))


def _dropout(named: list[tuple[str, nn.Module]]) -> tuple[float, bool]:
    """The block's dropout: (probability, whole channels), alike in every layer."""
    kinds = {name: (layer.drop_rate if layer.training else 0.0, _drops_whole_channels(layer)) for name, layer in named}
    if len({rate for rate, _ in kinds.values()}) > 1:
        rates = {name: rate for name, (rate, _) in kinds.items()}
        raise ValueError(
            "efficient mode needs the same effective dropout rate (drop_rate when training, "
            f"else 0) in every layer of a block; got {rates}"
        )
    p = next(iter(kinds.values()))[0]
    if p > 0 and len({whole for _, whole in kinds.values()}) > 1:
        wholes = {name: whole for name, (_, whole) in kinds.items()}
        raise ValueError(
            f"efficient mode needs every layer of a block to drop alike (single values or whole channels); got {wholes}"
        )
    return float(p), p > 0 and next(iter(kinds.values()))[1]


def dense_block(
    input: Tensor,
    layers: Mapping[str, nn.Module] | Iterable[nn.Module],
    recompute_bottleneck: bool = False,
    sync_group: str | None = None,
) -> Tensor:
    """Runs ``layers`` (torchvision-style dense layers: norm1, relu1, conv1,
    norm2, relu2, conv2, drop_rate) as one efficient dense block.

    Each BatchNorm behaves as the module would (batch statistics in training
    or without running statistics, running statistics otherwise; running
    statistics updated once per training call). ``recompute_bottleneck``
    trades one extra 1×1 convolution per layer in backward for not keeping
    the bottleneck activations.

    Under ``torch.autocast`` the block runs in the autocast dtype: the input
    (if float32) is cast to it, the convolutions run on copies of their
    weights in it (made one layer at a time inside the operator, so unlike
    autocast's casts none is kept for backward), and the output has it;
    BatchNorm keeps float32 parameters, statistics and arithmetic, as
    ``nn.BatchNorm2d`` does under autocast. (Naive mode's ``torch.cat`` would
    promote a float32 block input back to float32; inside a network under
    autocast the input already arrives in the autocast dtype.)

    ``sync_group`` (a process group's name) makes batch statistics those of
    the global batch over the group's ranks: synchronised BatchNorm.
    """
    named = _named_layers(layers)
    _check_input(input, named)
    require_kernels_for(input.device)
    bottleneck = _has_bottleneck(named[0][1])
    spatial_dims = spatial_dims_of(named[0][1])
    for name, layer in named:
        _check_layer(name, layer, bottleneck, spatial_dims)
    dropout_p, dropout_whole_channels = _dropout(named)
    modules = [layer for _, layer in named]
    norm1 = [layer.norm1 for layer in modules]
    norm2 = [layer.norm2 for layer in modules] if bottleneck else []

    def running(norms, stat):
        return [None if _uses_batch_stats(n) else getattr(n, stat) for n in norms]

    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad or any(p.requires_grad for layer in modules for p in layer.parameters())
    )
    compute_dtype = autocast_dtype(input)

    if compute_dtype is not None:
        input = input.to(compute_dtype)
    # Everything is already in its dtype; autocast must not touch the
    # convolutions inside the operator.
    with torch.autocast(input.device.type, enabled=False):
        results = ops.dense_block_forward(
            input=input,
            norm1_weight=[n.weight for n in norm1],
            norm1_bias=[n.bias for n in norm1],
            norm1_running_mean=running(norm1, "running_mean"),
            norm1_running_var=running(norm1, "running_var"),
            norm1_eps=[float(n.eps) for n in norm1],
            conv1_weight=[layer.conv1.weight for layer in modules],
            norm2_weight=[n.weight for n in norm2],
            norm2_bias=[n.bias for n in norm2],
            norm2_running_mean=running(norm2, "running_mean"),
            norm2_running_var=running(norm2, "running_var"),
            norm2_eps=[float(n.eps) for n in norm2],
            conv2_weight=[layer.conv2.weight for layer in modules if bottleneck],
            dropout_p=dropout_p,
            dropout_whole_channels=dropout_whole_channels,
            recompute_bottleneck=recompute_bottleneck,
            save_for_backward=needs_grad,
            sync_group=sync_group or "",
        )
    results = dict(zip(FORWARD_RESULTS, results))
    _update_running_stats(modules, results["batch_mean"], results["batch_var"], results["count"])
    return results["output"]


def _update_running_stats(layers, batch_mean, batch_var, count) -> None:
    """One update of every training norm's running statistics, from the
    block's flat statistics (csrc/dense_block.h gives their layout)."""
    first = layers[0]
    bottleneck = _has_bottleneck(first)
    growth = first.conv2.out_channels if bottleneck else first.conv1.out_channels
    width_4k = first.conv1.out_channels if bottleneck else 0
    bottleneck_start = block_statistics_size(first.conv1.in_channels, len(layers), growth, 0)
    norms, offsets = [], []
    for index, layer in enumerate(layers):
        stats = [(layer.norm1, 0)]
        if bottleneck:
            stats.append((layer.norm2, bottleneck_start + index * width_4k))
        for norm, offset in stats:
            if _updates_running_stats(norm):
                norms.append(norm)
                offsets.append(offset)
    if not norms:
        return
    ops.update_running_stats(
        [n.running_mean for n in norms],
        [n.running_var for n in norms],
        [n.num_batches_tracked for n in norms],
        [None if n.momentum is None else float(n.momentum) for n in norms],
        offsets,
        batch_mean,
        batch_var,
        count,
    )
