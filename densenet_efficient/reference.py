"""Pure-PyTorch references: the test oracle.

* ``ReferenceDenseLayer`` / ``ReferenceDenseBlock``: the naive dense block
  (torch.cat + nn.BatchNorm2d + ReLU + Conv2d, or their 1-D/3-D forms) with torchvision's structure,
  names and semantics (``memory_efficient=True`` is torchvision's
  checkpointing). Their state_dicts are interchangeable with torchvision's
  ``_DenseLayer`` / ``_DenseBlock`` and with ours.
* ``channel_stats`` / ``bn_relu``: what the custom per-channel operators
  compute, written with plain tensor operations.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# The layer types of each spatial rank (spatial_dims 1, 2, 3).
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def per_dim(value, dims: int) -> tuple[int, ...]:
    """A layer's size argument (an int, or one per spatial dimension) as one per dimension."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def checked_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in CONV:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def channel_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dimension but C."""
    x = input.to(_math_dtype(input.dtype))
    dims = (0, *range(2, input.dim()))
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def bn_relu(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """relu(weight * (input - mean) / sqrt(var + eps) + bias), per channel."""
    math = _math_dtype(input.dtype)
    as_channels = lambda v: v.to(math).view(1, -1, *([1] * (input.dim() - 2)))  # noqa: E731
    invstd = torch.rsqrt(as_channels(var) + eps)
    y = (input.to(math) - as_channels(mean)) * invstd * as_channels(weight) + as_channels(bias)
    return torch.relu(y).to(input.dtype)


class ReferenceDenseLayer(nn.Module):
    """torchvision's ``_DenseLayer``: BN-ReLU-Conv1x1(bn_size·k) → BN-ReLU-Conv3x3(k).

    ``bn_size=0`` gives the plain DenseNet layer (no bottleneck):
    BN-ReLU-Conv3x3(k), modules ``norm1``, ``relu1``, ``conv1``.
    ``spatial_dims`` 3 builds it of BatchNorm3d/Conv3d (1×1×1 and 3×3×3) for
    volumes [N, C, D, H, W]; 1 of BatchNorm1d/Conv1d for [N, C, L].
    """

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if bn_size < 0:
            raise ValueError(f"bn_size must be positive, or 0 for layers without bottleneck; got {bn_size}")
        conv, norm = CONV[checked_spatial_dims(spatial_dims)], BATCH_NORM[spatial_dims]
        self.norm1 = norm(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        if bn_size == 0:
            self.conv1 = conv(num_input_features, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = conv(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
            self.norm2 = norm(bn_size * growth_rate)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = conv(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, *inputs: Tensor) -> Tensor:
        concatenated = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concatenated)))

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        prev_features = [input] if isinstance(input, Tensor) else list(input)
        if self.memory_efficient and any(t.requires_grad for t in prev_features):
            bottleneck = cp.checkpoint(self.bn_function, *prev_features, use_reentrant=False)
        else:
            bottleneck = self.bn_function(*prev_features)
        if not hasattr(self, "conv2"):  # plain layer: conv1 already gave the new features
            new_features = bottleneck
        else:
            new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        return self.drop(new_features)

    def drop(self, new_features: Tensor) -> Tensor:
        """Dropout of the new features: single values, as torchvision's."""
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


def concatenate_dense_features(layers: Iterable[nn.Module], init_features: Tensor) -> Tensor:
    """The naive block: every layer reads the list of all earlier features;
    the output is their concatenation."""
    features = [init_features]
    for layer in layers:
        features.append(layer(features))
    return torch.cat(features, 1)


class ReferenceDenseBlock(nn.ModuleDict):
    """torchvision's ``_DenseBlock``: children ``denselayer1..L``."""

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = ReferenceDenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
                spatial_dims=spatial_dims,
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        return concatenate_dense_features(self.values(), init_features)
