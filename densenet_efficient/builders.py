"""Models by name, as the commands take them: our builders
(``models.BUILDERS``), CIFAR DenseNets of any depth and growth rate, and
MONAI's DenseNets converted. Its own module: MONAI's builder converts, and
conversion builds on the models."""

from __future__ import annotations

import importlib.util
import re

import torch
from torch import nn

from .conversion import convert
from .models import BUILDERS, densenet_bc, densenet_cifar


def builder(name: str):
    """A model builder by name: one of BUILDERS, ``densenet_bc-<depth>-<k>``
    / ``densenet_cifar-<depth>-<k>`` for any CIFAR depth and growth rate, or
    ``monai:<class>`` for MONAI's DenseNet121/169/201/264 (converted). Every
    builder takes ``mode``, ``recompute_bottleneck``, ``spatial_dims``,
    ``in_channels``, ``num_classes`` and ``drop_rate``."""
    if name in BUILDERS:
        return BUILDERS[name]
    match = re.fullmatch(r"(densenet_bc|densenet_cifar)-(\d+)-(\d+)", name)
    if match:
        family, depth, growth_rate = match.group(1), int(match.group(2)), int(match.group(3))
        make = densenet_bc if family == "densenet_bc" else densenet_cifar
        return lambda **kwargs: make(depth, growth_rate, **kwargs)
    if name.startswith(_MONAI_PREFIX):
        return _monai_builder(name[len(_MONAI_PREFIX):])
    raise ValueError(
        f"unknown model {name!r}; choose one of {sorted(BUILDERS)}, densenet_bc-<depth>-<k> / "
        f"densenet_cifar-<depth>-<k>, or {', '.join(_MONAI_PREFIX + c for c in MONAI_MODELS)}"
    )


def default_input_size(name: str, spatial_dims: int = 2) -> int:
    """The input's side length a model is usually trained at: 32 for the
    CIFAR networks, 96 for volumes, 224 otherwise (ImageNet)."""
    with torch.device("meta"):
        small = getattr(builder(name)(), "small_inputs", False)
    return 32 if small else 96 if spatial_dims == 3 else 224


_MONAI_PREFIX = "monai:"
MONAI_MODELS = ("DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264")


def _monai_builder(class_name: str):
    if class_name not in MONAI_MODELS:
        raise ValueError(f"unknown MONAI model {class_name!r}; choose one of {list(MONAI_MODELS)}")
    if importlib.util.find_spec("monai") is None:
        raise ValueError(f"{_MONAI_PREFIX}{class_name} needs MONAI: pip install monai")

    def build(mode="efficient", recompute_bottleneck=False, spatial_dims=2, in_channels=3, num_classes=1000,
              drop_rate=0.0) -> nn.Module:
        from monai.networks import nets

        model = getattr(nets, class_name)(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, dropout_prob=drop_rate
        )
        return convert(model, mode=mode, recompute_bottleneck=recompute_bottleneck)

    return build
