"""Drop-in dense layer and block modules with a switchable implementation.

Parameters, buffers and state_dict keys are torchvision's (``denselayerN.norm1``,
``relu1``, ``conv1``, ``norm2``, ``relu2``, ``conv2``), so state_dicts move
freely between these modules, ``densenet_efficient.reference`` and
torchvision's ``_DenseBlock``. ``mode`` picks the implementation and may be
changed on a live module:

* ``"naive"``: torch.cat per layer (torchvision's ``memory_efficient=False``);
* ``"checkpoint"``: torch.utils.checkpoint around concat-BN-ReLU-conv1x1
  (torchvision's ``memory_efficient=True``);
* ``"efficient"``: one block buffer, shared statistics, recomputation in
  backward: memory linear in depth (docs/design.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional
from .export import export_runs_modules
from .reference import ReferenceDenseLayer, concatenate_dense_features

__all__ = ["MODES", "DenseBlock", "DenseLayer"]

MODES = ("naive", "checkpoint", "efficient")


def _checked_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


class DenseLayer(ReferenceDenseLayer):
    """One DenseNet-B layer. Takes a tensor or a list of tensors (the earlier
    features) and returns its ``growth_rate`` new channels. ``spatial_dims``
    3 makes it a layer for volumes (BatchNorm3d, Conv3d), 1 for sequences."""

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        mode: str = "efficient",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(num_input_features, growth_rate, bn_size, drop_rate, spatial_dims=spatial_dims)
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = _checked_mode(mode)
        self.memory_efficient = mode == "checkpoint"

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        if self.mode != "efficient" or export_runs_modules(self):
            return super().forward(input)
        prev_features = [input] if isinstance(input, Tensor) else list(input)
        features = prev_features[0] if len(prev_features) == 1 else torch.cat(prev_features, 1)
        block_output = functional.dense_block(features, [self])
        return block_output[:, features.shape[1]:]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, drop_rate={self.drop_rate}"


class DenseBlock(nn.ModuleDict):
    """A dense block of ``num_layers`` layers; returns the input and all new
    features concatenated (``num_input_features + num_layers * growth_rate``
    channels), exactly as torchvision's ``_DenseBlock``. ``spatial_dims``
    (1, 2 or 3) is the input's: [N, C, L], [N, C, H, W] or [N, C, D, H, W]."""

    # A process group's name: efficient mode then normalises by the
    # statistics of the global batch (see densenet_efficient.sync).
    sync_group: str | None = None

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        growth_rate: int,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        mode: str = "efficient",
        recompute_bottleneck: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        for i in range(num_layers):
            layer = DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                mode=mode,
                spatial_dims=spatial_dims,
            )
            self.add_module(f"denselayer{i + 1}", layer)
        self.mode = mode
        self.recompute_bottleneck = recompute_bottleneck

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = _checked_mode(mode)
        for layer in self.values():
            layer.mode = mode

    def forward(self, init_features: Tensor) -> Tensor:
        if self.mode == "efficient" and not export_runs_modules(self):
            return functional.dense_block(init_features, self, self.recompute_bottleneck, self.sync_group)
        functional.check_block_input(init_features, self)
        return concatenate_dense_features(self.values(), init_features)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, recompute_bottleneck={self.recompute_bottleneck}"
