"""Measuring and predicting the activation memory autograd keeps for backward."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["dense_block_peak_bytes", "dense_block_saved_bytes", "saved_tensor_bytes"]


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
