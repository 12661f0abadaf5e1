"""Measuring and predicting the activation memory autograd keeps for backward."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["dense_block_peak_bytes", "dense_block_saved_bytes", "model_saved_bytes", "saved_tensor_bytes"]


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


class _BlockSizes:
    """Byte counts of one efficient block's buffers."""

    def __init__(self, batch, height, width, num_input_features, num_layers, growth_rate, bn_size, dtype):
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.math_itemsize = _math_itemsize(dtype)
        self.plane = batch * height * width
        self.num_layers = num_layers
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.width_4k = bn_size * growth_rate
        self.out_channels = num_input_features + num_layers * growth_rate
        self.max_in = num_input_features + (num_layers - 1) * growth_rate

    def maps(self, channels: int) -> int:
        """Bytes of `channels` feature maps of the whole batch."""
        return self.plane * channels * self.itemsize

    def statistics(self) -> int:
        return 2 * (self.max_in + self.num_layers * self.width_4k) * self.math_itemsize

    def parameters(self) -> int:
        total = 0
        for layer in range(self.num_layers):
            channels = self.num_input_features + layer * self.growth_rate
            if self.width_4k:
                total += 2 * channels + channels * self.width_4k  # norm1, conv1 1x1
                total += 2 * self.width_4k + self.width_4k * self.growth_rate * 9  # norm2, conv2
            else:
                total += 2 * channels + channels * self.growth_rate * 9  # norm1, conv1 3x3
        return total * self.itemsize


def dense_block_saved_bytes(
    batch: int,
    height: int,
    width: int,
    num_input_features: int,
    num_layers: int,
    growth_rate: int,
    bn_size: int = 4,
    dtype: torch.dtype = torch.float32,
    drop_rate: float = 0.0,
    recompute_bottleneck: bool = False,
) -> int:
    """Activation bytes an efficient-mode DenseBlock saves for backward in a
    training step (parameters and buffers not counted):

    * the block buffer, which is the output: N·(C0 + L·k)·H·W elements;
    * per layer its bottleneck, N·bn_size·k·H·W (not with recompute_bottleneck;
      none for plain layers, bn_size=0);
    * per-channel batch statistics: mean and variance of the C0 + (L−1)·k
      channels some norm1 reads and of each layer's bn_size·k bottleneck
      channels, in the math dtype (float32 for half/bfloat16);
    * with dropout, one bool mask of N·k·H·W per layer.
    """
    s = _BlockSizes(batch, height, width, num_input_features, num_layers, growth_rate, bn_size, dtype)
    total = s.maps(s.out_channels) + s.statistics()
    if not recompute_bottleneck:
        total += num_layers * s.maps(s.width_4k)
    if drop_rate > 0:
        total += num_layers * s.plane * growth_rate  # torch.bool
    return total


def dense_block_peak_bytes(
    batch: int,
    height: int,
    width: int,
    num_input_features: int,
    num_layers: int,
    growth_rate: int,
    bn_size: int = 4,
    dtype: torch.dtype = torch.float32,
    drop_rate: float = 0.0,
    recompute_bottleneck: bool = False,
) -> int:
    """Peak bytes a training step of an efficient-mode DenseBlock allocates
    beyond its parameters, its input and the output gradient — what
    ``torch.cuda.max_memory_allocated`` adds, convolution workspaces aside.

    Backward holds what forward saved, the gradient buffer (as large as the
    output), the two scratches (the widest norm1 input; one bottleneck) and,
    in its first (widest) layer, the 3×3 conv's input gradient, the
    bottleneck gradient and the 1×1 conv's input gradient (plus the
    recomputed bottleneck and the dropout gradient where they apply), and the
    parameter gradients. Forward holds the saved tensors and the same two
    scratches and one layer's new features; backward is the larger.
    """
    s = _BlockSizes(batch, height, width, num_input_features, num_layers, growth_rate, bn_size, dtype)
    saved = dense_block_saved_bytes(
        batch, height, width, num_input_features, num_layers, growth_rate, bn_size, dtype,
        drop_rate, recompute_bottleneck,
    )
    scratches = s.maps(s.max_in) + s.maps(s.width_4k)
    transients = 2 * s.maps(s.width_4k) + s.maps(s.max_in)
    if recompute_bottleneck:
        transients += s.maps(s.width_4k)
    if drop_rate > 0:
        transients += s.maps(growth_rate)
    return saved + s.maps(s.out_channels) + scratches + transients + s.parameters()


# --- whole models ---------------------------------------------------------


class _Tensor:
    """The activation flowing through a model: its shape, and whether its
    storage already counts as saved (so a second op saving it adds nothing)."""

    def __init__(self, batch, channels, height, width, saved=False):
        self.batch, self.channels, self.height, self.width, self.saved = batch, channels, height, width, saved

    def numel(self) -> int:
        return self.batch * self.channels * self.height * self.width

    def new(self, channels=None, height=None, width=None) -> "_Tensor":
        return _Tensor(self.batch, channels or self.channels, height or self.height, width or self.width)


def _pooled(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


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

    def module(self, module: nn.Module, x: _Tensor) -> _Tensor:
        from .models import Transition
        from .modules import DenseBlock

        if isinstance(module, nn.Conv2d):
            self.save(x)
            return x.new(
                module.out_channels,
                _pooled(x.height, module.kernel_size[0], module.stride[0], module.padding[0]),
                _pooled(x.width, module.kernel_size[1], module.stride[1], module.padding[1]),
            )
        if isinstance(module, nn.BatchNorm2d):
            return self.batch_norm(x)
        if isinstance(module, nn.ReLU):  # in place: saves its result, the same storage
            self.save(x)
            return x
        if isinstance(module, nn.MaxPool2d):
            self.save(x)
            y = x.new(height=_pooled(x.height, module.kernel_size, module.stride, module.padding),
                      width=_pooled(x.width, module.kernel_size, module.stride, module.padding))
            self.total += y.numel() * 8  # int64 indices
            return y
        if isinstance(module, nn.AvgPool2d):
            self.save(x)
            return x.new(height=_pooled(x.height, module.kernel_size, module.stride, 0),
                         width=_pooled(x.width, module.kernel_size, module.stride, 0))
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
        plane = x.batch * x.height * x.width
        dropout = self.training and layers[0].drop_rate > 0
        dropout_bytes = growth * plane * (1 if self.device_type == "cuda" else self.itemsize)
        if block.mode == "efficient":
            self.total += dense_block_saved_bytes(
                x.batch, x.height, x.width, x.channels, num_layers, growth,
                bn_size=width_4k // growth, dtype=_dtype_of(self.itemsize, self.math_itemsize),
                drop_rate=layers[0].drop_rate if self.training else 0.0,
                recompute_bottleneck=block.recompute_bottleneck,
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


def _dtype_of(itemsize: int, math_itemsize: int) -> torch.dtype:
    return {8: torch.float64, 4: torch.float32}.get(itemsize, torch.bfloat16)


def model_saved_bytes(
    model: nn.Module,
    batch: int,
    height: int,
    width: int,
    dtype: torch.dtype = torch.float32,
    training: bool | None = None,
    device_type: str = "cpu",
) -> int:
    """Activation bytes autograd saves for backward in a forward pass of one of
    our DenseNets (``densenet_efficient.models.DenseNet``) on a
    [batch, 3, height, width] input that needs no gradient, in each dense
    block's own mode. Parameters and buffers are not counted; the input
    image is (the first convolution saves it). ``training`` defaults to the
    model's mode; ``device_type`` matters only for dropout (CPU keeps a
    float noise tensor, CUDA a bool mask)."""
    counter = _SavedBytes(dtype, model.training if training is None else training, device_type)
    x = _Tensor(batch, 3, height, width)
    x = counter.module(model.features, x)
    counter.save(x)  # F.relu(..., inplace=True) after norm5
    counter.total += batch * x.channels * counter.itemsize  # the classifier's input
    return counter.total
