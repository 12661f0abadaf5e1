"""Measuring and predicting the activation memory autograd keeps for backward."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["dense_block_saved_bytes", "saved_tensor_bytes"]


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
    * per layer its bottleneck, N·bn_size·k·H·W (not with recompute_bottleneck);
    * per-channel batch statistics: mean and variance of the C0 + (L−1)·k
      channels some norm1 reads and of each layer's bn_size·k bottleneck
      channels, in the math dtype (float32 for half/bfloat16);
    * with dropout, one bool mask of N·k·H·W per layer.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    plane = batch * height * width
    width_4k = bn_size * growth_rate
    out_channels = num_input_features + num_layers * growth_rate
    max_in = num_input_features + (num_layers - 1) * growth_rate
    total = plane * out_channels * itemsize
    if not recompute_bottleneck:
        total += num_layers * plane * width_4k * itemsize
    total += 2 * (max_in + num_layers * width_4k) * _math_itemsize(dtype)
    if drop_rate > 0:
        total += num_layers * plane * growth_rate  # torch.bool
    return total
