"""Measuring and predicting the activation memory autograd keeps for backward."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import _AvgPoolNd, _MaxPoolNd

from .reference import per_dim

__all__ = [
    "StepMemory",
    "dense_block_peak_bytes",
    "dense_block_saved_bytes",
    "estimate_training_step",
    "model_saved_bytes",
    "saved_tensor_bytes",
]


def _storage_key(t: Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def saved_tensor_bytes(
    fn: Callable[..., Any], *args: Any, ignore: Iterable[Tensor] = ()
) -> tuple[Any, int]:
    """Runs ``fn(*args)`` and returns ``(result, bytes)``: the bytes of every
    storage autograd saved for backward meanwhile, each storage counted once,
    leaving out the storages of ``ignore`` (pass the parameters and buffers
    to count activations only)."""
    ignored = {_storage_key(t) for t in ignore}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in ignored:
            seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args)
    return result, sum(seen.values())


def _math_itemsize(dtype: torch.dtype) -> int:
    math = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.empty((), dtype=math).element_size()


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


class _BlockSizes:
    """Byte counts of one efficient block's buffers, for a block input of
    shape [N, C0, *spatial]."""

    def __init__(self, input_shape, num_layers, growth_rate, bn_size, dtype):
        batch, num_input_features, *spatial = input_shape
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.math_itemsize = _math_itemsize(dtype)
        self.plane = batch * _numel(spatial)
        self.kernel_3 = 3 ** len(spatial)  # elements of a 3×3 (×3) kernel
        self.num_layers = num_layers
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.width_4k = bn_size * growth_rate
        self.out_channels = num_input_features + num_layers * growth_rate
        self.max_in = num_input_features + (num_layers - 1) * growth_rate

    def maps(self, channels: int) -> int:
        """Bytes of `channels` feature maps of the whole batch."""
        return self.plane * channels * self.itemsize

    def scratch(self) -> int:
        """The scratch norm1's and norm2's outputs take turns in (the
        bottleneck kept)."""
        return self.maps(max(self.max_in, self.width_4k))

    def statistics(self) -> int:
        """Batch mean and variance, flat, and the count (one int64)."""
        return 2 * (self.max_in + self.num_layers * self.width_4k) * self.math_itemsize + 8

    def parameters(self) -> int:
        total = 0
        for layer in range(self.num_layers):
            channels = self.num_input_features + layer * self.growth_rate
            if self.width_4k:
                total += 2 * channels + channels * self.width_4k  # norm1, conv1 1x1
                total += 2 * self.width_4k + self.width_4k * self.growth_rate * self.kernel_3  # norm2, conv2
            else:
                total += 2 * channels + channels * self.growth_rate * self.kernel_3  # norm1, conv1 3x3
        return total * self.itemsize


def dense_block_saved_bytes(
    input_shape: Sequence[int],
    num_layers: int,
    growth_rate: int,
    bn_size: int = 4,
    dtype: torch.dtype = torch.float32,
    drop_rate: float = 0.0,
    recompute_bottleneck: bool = False,
    dropout_whole_channels: bool = False,
) -> int:
    """Activation bytes an efficient-mode DenseBlock saves for backward in a
    training step on an input of shape ``input_shape`` = [N, C0, *spatial]
    (1 to 3 spatial dimensions; P their product), parameters and buffers not
    counted:

    * the block buffer, which is the output: N·(C0 + L·k)·P elements;
    * per layer its bottleneck, N·bn_size·k·P (not with recompute_bottleneck;
      none for plain layers, bn_size=0);
    * per-channel batch statistics: mean and variance of the C0 + (L−1)·k
      channels some norm1 reads and of each layer's bn_size·k bottleneck
      channels, in the math dtype (float32 for half/bfloat16), and the number
      of values per channel (one int64);
    * with dropout, one bool mask of N·k·P per layer; dropping whole channels
      (F.dropout2d/3d), the scaled noise of N·k values per layer instead.
    """
    s = _BlockSizes(input_shape, num_layers, growth_rate, bn_size, dtype)
    total = s.maps(s.out_channels) + s.statistics()
    if not recompute_bottleneck:
        total += num_layers * s.maps(s.width_4k)
    if drop_rate > 0:
        batch = input_shape[0]
        per_layer = batch * growth_rate * s.itemsize if dropout_whole_channels else s.plane * growth_rate  # bool
        total += num_layers * per_layer
    return total


def dense_block_peak_bytes(
    input_shape: Sequence[int],
    num_layers: int,
    growth_rate: int,
    bn_size: int = 4,
    dtype: torch.dtype = torch.float32,
    drop_rate: float = 0.0,
    recompute_bottleneck: bool = False,
    dropout_whole_channels: bool = False,
) -> int:
    """Peak bytes a training step of an efficient-mode DenseBlock on an input
    of shape ``input_shape`` = [N, C0, *spatial] allocates beyond its
    parameters, its input and the output gradient — what
    ``torch.cuda.max_memory_allocated`` adds, convolution workspaces aside.

    Backward holds what forward saved, the gradient buffer (the channels
    some norm1 reads), the scratch the BN-ReLU outputs take turns in (the
    widest norm1 input or one bottleneck; with a recomputed bottleneck two,
    one of each width), the parameter gradients and, in its first (widest)
    layer, the larger of two moments: the 3×3 conv's input gradient with the
    bottleneck gradient (and the recomputed bottleneck), then the bottleneck
    gradient with the 1×1 conv's input gradient (on CUDA a new tensor; on the
    CPU it takes the spent scratch). Plain layers hold the 3×3 conv's input
    gradient, as wide as the norm1 input; dropout adds its gradient. Forward
    holds the saved tensors, the scratch and one layer's new features (and a
    recomputed bottleneck); backward is the larger.
    """
    s = _BlockSizes(input_shape, num_layers, growth_rate, bn_size, dtype)
    saved = dense_block_saved_bytes(
        input_shape, num_layers, growth_rate, bn_size, dtype, drop_rate, recompute_bottleneck, dropout_whole_channels
    )
    if not s.width_4k:
        scratches, transients = s.maps(s.max_in), s.maps(s.max_in)
    elif recompute_bottleneck:
        scratches = s.maps(s.max_in) + s.maps(s.width_4k)
        transients = max(3 * s.maps(s.width_4k), s.maps(s.width_4k) + s.maps(s.max_in))
    else:
        scratches = s.scratch()
        transients = max(2 * s.maps(s.width_4k), s.maps(s.width_4k) + s.maps(s.max_in))
    if drop_rate > 0:
        transients += s.maps(growth_rate)
    return saved + s.maps(s.max_in) + scratches + transients + s.parameters()


# --- whole models ---------------------------------------------------------


class _Tensor:
    """The activation flowing through a model: its shape [N, C, *spatial], and
    whether its storage already counts as saved (so a second op saving it adds
    nothing)."""

    def __init__(self, batch, channels, spatial, saved=False):
        self.batch, self.channels, self.spatial, self.saved = batch, channels, tuple(spatial), saved

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, *self.spatial)

    def numel(self) -> int:
        return _numel(self.shape)

    def new(self, channels=None, spatial=None) -> "_Tensor":
        return _Tensor(self.batch, channels or self.channels, self.spatial if spatial is None else spatial)


def _pooled(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _window_output(x: "_Tensor", kernel, stride, padding, dilation=1) -> tuple[int, ...]:
    """Spatial output sizes of a convolution or pooling window over `x`."""
    dims = len(x.spatial)
    stride = kernel if stride is None else stride
    return tuple(
        _pooled(size, k, s, p, d)
        for size, k, s, p, d in zip(
            x.spatial, per_dim(kernel, dims), per_dim(stride, dims), per_dim(padding, dims), per_dim(dilation, dims)
        )
    )


class _SavedBytes:
    """Walks a DenseNet's features, adding up what autograd saves: each op's
    saved tensors as PyTorch's derivative formulas keep them, each storage once."""

    def __init__(self, dtype: torch.dtype, training: bool, device_type: str):
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.math_itemsize = _math_itemsize(dtype)
        self.training = training
        self.device_type = device_type
        self.total = 0

    def save(self, t: _Tensor) -> None:
        if not t.saved:
            self.total += t.numel() * self.itemsize
            t.saved = True

    def batch_norm(self, x: _Tensor) -> _Tensor:
        self.save(x)  # its input; and save_mean/save_invstd (empty in eval)
        if self.training:
            self.total += 2 * x.channels * self.math_itemsize
        return x.new()

    def stage(self, stage: tuple[nn.Module, ...], x: _Tensor) -> _Tensor:
        """One module, or a fused stem (conv, norm, relu, max pool: one operator)."""
        if len(stage) == 1:
            return self.module(stage[0], x)
        conv, norm, _, pool = stage
        self.save(x)  # the image, and batch statistics
        y = x.new(conv.out_channels, _window_output(x, conv.kernel_size, conv.stride, conv.padding))
        self.total += self._fused_stats(norm, y)
        return y.new(spatial=_window_output(y, pool.kernel_size, pool.stride, pool.padding))

    def _fused_stats(self, norm: nn.Module, x: _Tensor) -> int:
        """Bytes of the batch mean and variance a fused operator keeps."""
        return 2 * x.channels * self.math_itemsize if self.training or norm.running_mean is None else 0

    def module(self, module: nn.Module, x: _Tensor) -> _Tensor:
        from .models import DenseNetFeatures, Transition
        from .modules import DenseBlock

        if isinstance(module, Transition) and module.fused():
            self.save(x)  # its input, and batch statistics: nothing else
            self.total += self._fused_stats(module.norm, x)
            return x.new(module.conv.out_channels, tuple(size // 2 for size in x.spatial))
        if isinstance(module, DenseNetFeatures):
            for stage in module.stages():
                x = self.stage(stage, x)
            return x
        if isinstance(module, _ConvNd):
            self.save(x)
            spatial = _window_output(x, module.kernel_size, module.stride, module.padding, module.dilation)
            return x.new(module.out_channels, spatial)
        if isinstance(module, _BatchNorm):
            return self.batch_norm(x)
        if isinstance(module, nn.ReLU):  # in place: saves its result, the same storage
            self.save(x)
            return x
        if isinstance(module, _MaxPoolNd):
            self.save(x)
            y = x.new(spatial=_window_output(x, module.kernel_size, module.stride, module.padding, module.dilation))
            self.total += y.numel() * 8  # int64 indices
            return y
        if isinstance(module, _AvgPoolNd):
            self.save(x)
            return x.new(spatial=_window_output(x, module.kernel_size, module.stride, module.padding))
        if isinstance(module, (nn.Sequential, Transition)):
            for child in module.children():
                x = self.module(child, x)
            return x
        if isinstance(module, DenseBlock):
            return self.dense_block(module, x)
        raise NotImplementedError(f"memory model: no rule for {type(module).__name__}")

    def dense_block(self, block, x: _Tensor) -> _Tensor:
        layers = list(block.values())
        growth = layers[0].conv2.out_channels if hasattr(layers[0], "conv2") else layers[0].conv1.out_channels
        width_4k = layers[0].conv1.out_channels if hasattr(layers[0], "conv2") else 0
        num_layers = len(layers)
        out = x.new(x.channels + num_layers * growth)
        plane = x.batch * _numel(x.spatial)
        dropout = self.training and layers[0].drop_rate > 0
        whole_channels = bool(getattr(layers[0], "drops_whole_channels", False))
        if whole_channels:  # F.dropout2d/3d: input * noise keeps the noise, [N, k, 1, ...]
            dropout_bytes = growth * x.batch * self.itemsize
        else:  # F.dropout: a bool mask on CUDA, the float noise on CPU
            dropout_bytes = growth * plane * (1 if self.device_type == "cuda" else self.itemsize)
        if block.mode == "efficient":
            self.total += dense_block_saved_bytes(
                x.shape, num_layers, growth,
                bn_size=width_4k // growth, dtype=_dtype_of(self.itemsize, self.math_itemsize),
                drop_rate=layers[0].drop_rate if self.training else 0.0,
                recompute_bottleneck=block.recompute_bottleneck,
                dropout_whole_channels=whole_channels,
            )
            out.saved = True  # the block buffer is saved, and is the output
            return out
        stats = 2 * self.math_itemsize if self.training else 0
        if block.mode == "checkpoint":
            # torch.utils.checkpoint keeps each layer's inputs: the block input and
            # every new feature map but the last; inside, only what follows conv1 saves.
            self.save(x)
            self.total += (num_layers - 1) * growth * plane * self.itemsize
            per_layer = 2 * width_4k * plane * self.itemsize + width_4k * stats
        else:
            per_layer = 2 * width_4k * plane * self.itemsize + width_4k * stats
            for layer in range(num_layers):  # the concatenation and the norm1-ReLU output
                channels = x.channels + layer * growth
                self.total += 2 * channels * plane * self.itemsize + channels * stats
        self.total += num_layers * (per_layer + (dropout_bytes if dropout else 0))
        return out


def _stages(features: nn.Module) -> list[tuple[nn.Module, ...]]:
    from .models import DenseNetFeatures

    return features.stages() if isinstance(features, DenseNetFeatures) else [(child,) for child in features.children()]


def _dtype_of(itemsize: int, math_itemsize: int) -> torch.dtype:
    return {8: torch.float64, 4: torch.float32}.get(itemsize, torch.bfloat16)


def model_saved_bytes(
    model: nn.Module,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    training: bool | None = None,
    device_type: str = "cpu",
) -> int:
    """Activation bytes autograd saves for backward in a forward pass of a
    DenseNet on an input of shape ``input_shape`` ([N, C_in, *spatial], 1 to 3
    spatial dimensions) that needs no gradient, in each dense block's own
    mode. The model is one of ours (``densenet_efficient.models.DenseNet``) or
    torchvision's or MONAI's after ``convert``: ``model.features`` (stem,
    dense blocks, transitions, final norm), then ReLU, global average pooling
    and a linear classifier. Parameters and buffers are not counted; the
    input is (the first convolution saves it). ``training`` defaults to the
    model's mode; ``device_type`` matters only for dropout (CPU keeps a
    float noise tensor, CUDA a bool mask)."""
    counter = _SavedBytes(dtype, model.training if training is None else training, device_type)
    x = _input(input_shape)
    x = counter.module(model.features, x)
    counter.save(x)  # the ReLU (in place) after the final norm
    counter.total += x.batch * x.channels * counter.itemsize  # the classifier's input
    return counter.total


def _input(input_shape: Sequence[int]) -> _Tensor:
    batch, channels, *spatial = input_shape
    if not 1 <= len(spatial) <= 3:
        raise ValueError(f"input_shape must be [N, C, *spatial] with 1 to 3 spatial sizes, got {tuple(input_shape)}")
    return _Tensor(batch, channels, spatial)


# --- a whole training step --------------------------------------------------


class StepMemory(NamedTuple):
    """Predicted memory of one training step, in bytes."""

    state: int        # parameters, their gradients, optimizer state, buffers
    saved: int        # activations saved for backward (exact on CPU)
    activations: int  # peak of saved plus transient activations over the step
    total: int        # state + activations: what max_memory_allocated should approach


def _block_transients(block, x: _Tensor, itemsize: int, math_itemsize: int) -> tuple[int, int]:
    """(forward, backward) transient bytes of a dense block beyond what it
    saves: scratches, concatenations, gradient buffers, one layer's gradients."""
    layers = list(block.values())
    bottleneck = hasattr(layers[0], "conv2")
    growth = layers[0].conv2.out_channels if bottleneck else layers[0].conv1.out_channels
    width_4k = layers[0].conv1.out_channels if bottleneck else 0
    out_channels = x.channels + len(layers) * growth
    max_in = out_channels - growth
    maps = lambda channels: x.batch * _numel(x.spatial) * channels * itemsize  # noqa: E731
    if block.mode == "efficient":
        # Forward: the scratch, one layer's new features and a recomputed
        # bottleneck. Backward (dense_block_peak_bytes less what is saved and
        # the parameter gradients): the output gradient autograd hands in,
        # the gradient buffer, the scratches and one layer's gradients.
        dtype = _dtype_of(itemsize, math_itemsize)
        args = (x.shape, len(layers), growth, width_4k // growth, dtype, layers[0].drop_rate,
                block.recompute_bottleneck, bool(getattr(layers[0], "drops_whole_channels", False)))
        sizes = _BlockSizes(*args[:5])
        forward = sizes.scratch() + maps(growth)
        if block.recompute_bottleneck:
            forward += maps(width_4k)  # the bottleneck, not kept
        backward = dense_block_peak_bytes(*args) - dense_block_saved_bytes(*args) - sizes.parameters()
        return forward, backward + maps(out_channels)
    # torch.cat keeps every new feature map alive next to the concatenation;
    # backward holds the output gradient, the per-feature gradients it is
    # split into, and one layer's gradients (plus, with checkpointing, the
    # recomputed concatenation and norm1 output).
    forward = 2 * maps(out_channels)
    backward = 2 * maps(out_channels) + 2 * maps(max_in) + 3 * maps(width_4k)
    if block.mode == "checkpoint":
        backward += 2 * maps(max_in)
    return forward, backward


def estimate_training_step(
    model: nn.Module,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
    optimizer_slots: int = 1,
    device_type: str = "cuda",
) -> StepMemory:
    """Predicted memory of a training step (forward, backward, optimizer) of
    a DenseNet (as ``model_saved_bytes`` takes them) on an input of shape
    ``input_shape`` = [N, C_in, *spatial]: parameters (dtype),
    gradients, ``optimizer_slots`` tensors of optimizer state per parameter
    (SGD with momentum: 1, Adam: 2), and the activations — saved tensors
    exactly as ``model_saved_bytes`` counts them, plus the largest transient
    along a forward-then-backward timeline (backward frees each component's
    saved tensors as it passes them). With ``autocast_dtype`` activations are
    in that dtype and the low-precision copies of the convolution and
    classifier weights are saved too, but for efficient blocks' and fused
    stems' and transitions' (cast inside) and checkpointed layers' first
    convolutions (run again; their copies count at the end of the forward,
    in autocast's cache). Not followed: CPU autocast's float32 3-D pooling,
    whose float32 outputs the layers after it then save. Convolution
    workspaces are not included.
    """
    from .models import Transition
    from .modules import DenseBlock

    parameters = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    state = parameters * (2 + optimizer_slots) + buffers
    activation_dtype = autocast_dtype or dtype
    counter = _SavedBytes(activation_dtype, model.training, device_type)
    x = _input(input_shape)
    timeline = []  # (saved so far, forward transient, backward transient) per component
    fused_stem_convs = set()
    for stage in _stages(model.features):
        x_in = x
        x = counter.stage(stage, x)
        largest = max(x_in.numel(), x.numel()) * counter.itemsize
        if isinstance(stage[0], DenseBlock):
            forward, backward = _block_transients(stage[0], x_in, counter.itemsize, counter.math_itemsize)
        elif len(stage) == 4:  # a fused stem: conv0's output, made twice, beside its BN-ReLU output or gradients
            conv = stage[0]
            full = x_in.batch * conv.out_channels * _numel(
                _window_output(x_in, conv.kernel_size, conv.stride, conv.padding)) * counter.itemsize
            forward, backward = 2 * full, 3 * full
            fused_stem_convs.add(id(conv))
        elif isinstance(stage[0], Transition) and stage[0].fused():
            # Forward: the BatchNorm-ReLU output beside the pooled one; backward: its gradient and the input's.
            forward, backward = largest + x.numel() * counter.itemsize, 2 * largest + x.numel() * counter.itemsize
        else:
            forward, backward = largest, 2 * largest
        timeline.append((counter.total, forward, backward))
    counter.save(x)
    counter.total += x.batch * x.channels * counter.itemsize
    cached_only = 0
    if autocast_dtype is not None:
        # Autocast's low-precision weight copies, saved by every convolution
        # and by the classifier, but not by an efficient block's or a fused
        # stem's or transition's convolutions (cast inside, in forward and
        # again in backward; under CPU autocast 3-D stems and transitions run
        # as modules) nor by checkpointed layers' first convolutions (run
        # again in backward), whose copies autocast's cache still holds until
        # the forward's autocast region ends.
        cast_inside, checkpointed = set(), set()
        if not (device_type == "cpu" and len(input_shape) == 5):
            cast_inside.update(fused_stem_convs)
            cast_inside.update(id(m.conv) for m in model.modules() if isinstance(m, Transition) and m.fused())
        for block in model.modules():
            if isinstance(block, DenseBlock) and block.mode == "efficient":
                cast_inside.update(id(m) for m in block.modules())
            elif isinstance(block, DenseBlock) and block.mode == "checkpoint":
                checkpointed.update(id(layer.conv1) for layer in block.values())
        weights = {id(m): m.weight.numel() for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear))}
        saved_copies = sum(n for key, n in weights.items() if key not in cast_inside | checkpointed)
        counter.total += saved_copies * counter.itemsize
        cached_only = sum(n for key, n in weights.items() if key in checkpointed) * counter.itemsize
    saved = counter.total
    head = saved - timeline[-1][0]
    forward_peak = max(so_far + transient for so_far, transient, _ in timeline)
    backward_peak = max(so_far + transient for so_far, _, transient in timeline)
    activations = max(forward_peak, backward_peak + head, saved + cached_only)
    return StepMemory(state, saved, activations, state + activations)
