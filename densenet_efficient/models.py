"""DenseNets with torchvision's module names, built on our DenseBlock.

``DenseNet`` has torchvision's structure and ``state_dict`` keys
(``features.conv0``, ``norm0``, ``relu0``, ``pool0``,
``denseblockN.denselayerM.*``, ``transitionN.{norm,relu,conv,pool}``,
``norm5``, ``classifier``), so a torchvision DenseNet's ``state_dict`` loads
unchanged — torchvision's legacy ``norm.1``-style keys too. ``small_inputs``
gives the CIFAR networks of the paper: a 3×3 stem and no stem pooling.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused
from ._ops import block_memory_format
from .export import export_runs_modules
from .fused import stem_fusable, transition_fusable
from .modules import DenseBlock, _checked_mode
from .reference import AVG_POOL, BATCH_NORM, CONV, MAX_POOL, checked_spatial_dims

__all__ = [
    "BUILDERS",
    "DenseNet",
    "DenseNetFeatures",
    "Transition",
    "builder",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_bc",
    "densenet_bc_100_12",
    "densenet_bc_190_40",
    "densenet_bc_250_24",
    "densenet_cifar",
    "default_input_size",
]

# torchvision's _load_state_dict: '.'s are no longer allowed in module names,
# but early checkpoints have keys 'norm.1', 'relu.1', 'conv.1', 'norm.2', ...
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


_GLOBAL_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


class _Switchable:
    """A container that runs fused in efficient mode: a checked `mode`."""

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = _checked_mode(mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class Transition(_Switchable, nn.Sequential):
    """BN-ReLU-Conv1x1 (compression) + 2×2 average pooling (2×2×2 for
    ``spatial_dims=3``): torchvision's and MONAI's ``_Transition``. In
    ``mode="efficient"`` it runs as one operator that keeps only its input
    (``densenet_efficient.fused.transition``); otherwise module by module."""

    def __init__(
        self, num_input_features: int, num_output_features: int, spatial_dims: int = 2, mode: str = "efficient"
    ) -> None:
        super().__init__()
        self.norm = BATCH_NORM[checked_spatial_dims(spatial_dims)](num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = CONV[spatial_dims](num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = AVG_POOL[spatial_dims](kernel_size=2, stride=2)
        self.mode = mode

    def fused(self) -> bool:
        """Whether forward runs as one operator: efficient mode, and the
        layout the operator computes (a SyncBatchNorm, say, runs the modules)."""
        return self.mode == "efficient" and transition_fusable(self)

    def forward(self, input: Tensor) -> Tensor:
        if self.fused() and not export_runs_modules(self):
            if fused.runs_fused(input):
                return fused.transition(input, self)
            # The modules, laid out as the fused transition's output: ATen's
            # CPU avg_pool3d gives channels_last_3d input a contiguous output,
            # and the next block would then compute contiguous and copy each
            # of a channels-last model's 3×3×3 weights, and their gradients,
            # on every call.
            return super().forward(input).contiguous(memory_format=block_memory_format(input))
        return super().forward(input)

class DenseNetFeatures(_Switchable, nn.Sequential):
    """A DenseNet's feature extractor (``features``: stem, dense blocks,
    transitions, final norm), run as ``nn.Sequential`` but for the stem: in
    ``mode="efficient"`` its conv0-norm0-relu0-pool0 (convolution, BatchNorm,
    ReLU, max pool) run as one operator that keeps only the image
    (``densenet_efficient.fused.stem``)."""

    def __init__(self, *args, mode: str = "efficient") -> None:
        super().__init__(*args)
        self.mode = mode

    def stages(self) -> list[tuple[nn.Module, ...]]:
        """The children in order, one per stage, but a fused stem (conv,
        BatchNorm, ReLU, max pool) as one stage of four."""
        children, stages, i = list(self), [], 0
        while i < len(children):
            if self.mode == "efficient" and i + 3 < len(children) and stem_fusable(*children[i : i + 4]):
                stages.append(tuple(children[i : i + 4]))
                i += 4
            else:
                stages.append((children[i],))
                i += 1
        return stages

    def __getitem__(self, index):
        item = super().__getitem__(index)  # a slice is a DenseNetFeatures too: in this mode
        if isinstance(item, DenseNetFeatures):
            item.mode = self.mode
        return item

    def forward(self, input: Tensor) -> Tensor:
        for stage in self.stages():
            if len(stage) == 4 and fused.runs_fused(input) and not export_runs_modules(self):
                input = fused.stem(input, stage[0], stage[1], stage[3])
            else:
                for module in stage:
                    input = module(input)
        return input


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _LEGACY_KEY.match(key)
        if match:
            state_dict[match.group(1) + match.group(2)] = state_dict.pop(key)


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017) with a switchable implementation
    (``mode``: "naive", "checkpoint" or "efficient") of its dense blocks and,
    in efficient mode, its transitions and stem pooling (each one operator
    keeping only its input; ``Transition``, ``DenseNetFeatures``).

    ``bn_size=0`` builds plain layers (BN-ReLU-Conv3×3, no bottleneck);
    ``compression`` is the transitions' channel factor θ; ``small_inputs``
    selects the CIFAR stem (3×3 conv, no stem norm/pooling); the features end
    in a global average pooling (8×8 for 32×32 CIFAR inputs, 7×7 for 224×224).
    ``spatial_dims=3`` builds the same network for volumes [N, C, D, H, W]
    (BatchNorm3d, Conv3d, 3-D pooling: MONAI's DenseNet layout), 1 for
    sequences; ``in_channels`` is the input's channel count (3: RGB).
    """

    def __init__(
        self,
        growth_rate: int,
        block_config: tuple[int, ...],
        num_init_features: int,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        compression: float = 0.5,
        small_inputs: bool = False,
        mode: str = "efficient",
        recompute_bottleneck: bool = False,
        spatial_dims: int = 2,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.small_inputs = small_inputs
        self.spatial_dims = checked_spatial_dims(spatial_dims)
        self.in_channels = in_channels
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        conv, norm = CONV[spatial_dims], BATCH_NORM[spatial_dims]
        if small_inputs:
            stem = [("conv0", conv(in_channels, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))]
        else:
            stem = [
                ("conv0", conv(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", norm(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", MAX_POOL[spatial_dims](kernel_size=3, stride=2, padding=1)),
            ]
        self.features = DenseNetFeatures(OrderedDict(stem), mode=mode)
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(
                num_layers, num_features, growth_rate, bn_size, drop_rate,
                mode=mode, recompute_bottleneck=recompute_bottleneck, spatial_dims=spatial_dims,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                compressed = int(math.floor(num_features * compression))
                self.features.add_module(
                    f"transition{i + 1}", Transition(num_features, compressed, spatial_dims, mode=mode)
                )
                num_features = compressed
        self.features.add_module("norm5", norm(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, conv):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, norm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def dense_blocks(self) -> list[DenseBlock]:
        return [m for m in self.features if isinstance(m, DenseBlock)]

    def _switchable(self) -> list[nn.Module]:
        """Everything with a mode: the features (stem), blocks, transitions."""
        return [self.features, *(m for m in self.features if isinstance(m, (DenseBlock, Transition)))]

    @property
    def mode(self) -> str:
        modes = {module.mode for module in self._switchable()}
        return modes.pop() if len(modes) == 1 else "mixed"

    @mode.setter
    def mode(self, mode: str) -> None:
        for module in self._switchable():
            module.mode = mode

    @property
    def recompute_bottleneck(self) -> bool:
        return all(block.recompute_bottleneck for block in self.dense_blocks())

    @recompute_bottleneck.setter
    def recompute_bottleneck(self, value: bool) -> None:
        for block in self.dense_blocks():
            block.recompute_bottleneck = value

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = _GLOBAL_AVG_POOL[self.spatial_dims](out, 1)
        out = torch.flatten(out, 1)
        return self.classifier(out)




def _imagenet(growth_rate, block_config, num_init_features, **kwargs) -> DenseNet:
    return DenseNet(growth_rate, block_config, num_init_features, **kwargs)


def densenet121(**kwargs) -> DenseNet:
    """torchvision's densenet121: k=32, blocks (6, 12, 24, 16); 7,978,856 parameters."""
    return _imagenet(32, (6, 12, 24, 16), 64, **kwargs)


def densenet161(**kwargs) -> DenseNet:
    """torchvision's densenet161: k=48, blocks (6, 12, 36, 24); 28,681,000 parameters."""
    return _imagenet(48, (6, 12, 36, 24), 96, **kwargs)


def densenet169(**kwargs) -> DenseNet:
    """torchvision's densenet169: k=32, blocks (6, 12, 32, 32); 14,149,480 parameters."""
    return _imagenet(32, (6, 12, 32, 32), 64, **kwargs)


def densenet201(**kwargs) -> DenseNet:
    """torchvision's densenet201: k=32, blocks (6, 12, 48, 32); 20,013,928 parameters."""
    return _imagenet(32, (6, 12, 48, 32), 64, **kwargs)


def densenet264(**kwargs) -> DenseNet:
    """DenseNet-264 of the paper: k=32, blocks (6, 12, 64, 48)."""
    return _imagenet(32, (6, 12, 64, 48), 64, **kwargs)


def densenet_bc(depth: int, growth_rate: int, num_classes: int = 10, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC of depth L = 6n + 4: three dense blocks of n
    bottleneck layers, a 3×3 stem with 2k channels, compression 0.5."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 100, 190, 250), got {depth}")
    n = (depth - 4) // 6
    return DenseNet(
        growth_rate, (n, n, n), 2 * growth_rate, num_classes=num_classes, small_inputs=True, **kwargs
    )


def densenet_cifar(depth: int, growth_rate: int, num_classes: int = 10, **kwargs) -> DenseNet:
    """CIFAR DenseNet without bottleneck or compression, depth L = 3n + 4:
    three dense blocks of n BN-ReLU-Conv3×3 layers and a 3×3 stem with 16
    channels (the paper's L=40 and L=100 networks with k=12)."""
    if depth < 7 or (depth - 4) % 3:
        raise ValueError(f"DenseNet depth must be 3n + 4 with n >= 1 (e.g. 40, 100), got {depth}")
    n = (depth - 4) // 3
    return DenseNet(
        growth_rate, (n, n, n), 16, bn_size=0, compression=1.0, num_classes=num_classes, small_inputs=True, **kwargs
    )


def densenet_bc_100_12(**kwargs) -> DenseNet:
    """DenseNet-BC (L=100, k=12): 0.8M parameters."""
    return densenet_bc(100, 12, **kwargs)


def densenet_bc_250_24(**kwargs) -> DenseNet:
    """DenseNet-BC (L=250, k=24): 15.3M parameters."""
    return densenet_bc(250, 24, **kwargs)


def densenet_bc_190_40(**kwargs) -> DenseNet:
    """DenseNet-BC (L=190, k=40): 25.6M parameters."""
    return densenet_bc(190, 40, **kwargs)


BUILDERS = {
    f.__name__: f
    for f in (
        densenet121, densenet161, densenet169, densenet201, densenet264,
        densenet_bc_100_12, densenet_bc_250_24, densenet_bc_190_40,
    )
}
