"""MONAI's DenseNets (``monai.networks.nets.DenseNet`` and DenseNet121/169/
201/264, ``spatial_dims`` 1, 2 and 3). A MONAI ``_DenseBlock`` is a Sequential
of ``_DenseLayer``s, each holding its parts in a ``layers`` Sequential (norm1,
relu1, conv1, norm2, relu2, conv2, and ``dropout`` when dropout_prob > 0) and
returning its input concatenated with its new features: the block returns
exactly what our DenseBlock returns. The converted layer keeps that
``layers`` Sequential itself, so parameters, buffers and state_dict keys
(``denselayerN.layers.norm1.weight``) are the very same.

Every MONAI layer converts for naive and checkpoint mode, which run its own
modules (any norm, activation or dropout); efficient mode takes BatchNorm-ReLU
layers (the default ``norm="batch"``, ``act="relu"``) and draws their dropout
as MONAI does: whole channels for spatial_dims 2 and 3 (Dropout2d/3d), single
values for 1 (Dropout)."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import Tensor, nn

from ..modules import DenseLayer
from .common import check_layer_for_mode, library_layers, parts_in_our_layout

_PARTS = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")
_CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _monai_classes() -> tuple[type, type] | None:
    try:
        from monai.networks.nets.densenet import _DenseBlock, _DenseLayer
    except ImportError:
        return None
    return _DenseBlock, _DenseLayer


def block_classes() -> tuple[type, ...]:
    classes = _monai_classes()
    return (classes[0],) if classes else ()


def transition_parts(module: nn.Module) -> OrderedDict | None:
    if _monai_classes() is None:
        return None
    from monai.networks.nets.densenet import _Transition

    return parts_in_our_layout(module, (_Transition,))


class SequentialDenseLayer(DenseLayer):
    """Our DenseLayer in MONAI's layout: its parts live in ``layers`` (the
    MONAI layer's own Sequential). Like every DenseLayer it returns only its
    new features; the DenseBlock around it concatenates."""

    def __init__(self, layers: nn.Sequential, mode: str = "efficient") -> None:
        nn.Module.__init__(self)
        self.layers = layers
        self.mode = mode

    # The parts DenseLayer (and efficient mode's checks) read, from `layers`.
    norm1 = property(lambda self: self.layers.norm1)
    relu1 = property(lambda self: self.layers.relu1)
    conv1 = property(lambda self: self.layers.conv1)
    norm2 = property(lambda self: self.layers.norm2)
    relu2 = property(lambda self: self.layers.relu2)
    conv2 = property(lambda self: self.layers.conv2)

    @property
    def dropout_module(self) -> nn.Module | None:
        return getattr(self.layers, "dropout", None)

    @property
    def drop_rate(self) -> float:
        return float(self.dropout_module.p) if self.dropout_module is not None else 0.0

    @property
    def drops_whole_channels(self) -> bool:
        return isinstance(self.dropout_module, _CHANNEL_DROPOUT)

    def drop(self, new_features: Tensor) -> Tensor:
        # MONAI's own dropout module: naive and checkpoint mode compute exactly what MONAI does.
        return new_features if self.dropout_module is None else self.dropout_module(new_features)


def check(path: str, block: nn.Module, mode: str) -> None:
    _, monai_layer = _monai_classes()
    for where, layer in library_layers(path, block, monai_layer, "MONAI's _DenseLayer"):
        children = [child for child, _ in layer.named_children()]
        parts = [part for part, _ in layer.layers.named_children()] if children == ["layers"] else []
        if children != ["layers"] or parts not in (list(_PARTS), [*_PARTS, "dropout"]):
            found = children if children != ["layers"] else [f"layers.{part}" for part in parts]
            raise ValueError(
                f"convert: {where} has submodules {found}, expected layers.{{{', '.join(_PARTS)}}} "
                "(and layers.dropout); the model is unchanged"
            )
        dropout = getattr(layer.layers, "dropout", None)
        if dropout is not None and not (isinstance(dropout, (nn.Dropout, *_CHANNEL_DROPOUT)) and math.isfinite(dropout.p)):
            raise ValueError(f"convert: {where}.layers.dropout is {dropout!r}, not a torch dropout; the model is unchanged")
        check_layer_for_mode(where, SequentialDenseLayer(layer.layers, mode), mode)


def dense_layers(block: nn.Module, mode: str) -> list[tuple[str, DenseLayer]]:
    converted = []
    for name, layer in block.named_children():
        new = SequentialDenseLayer(layer.layers, mode)
        new.training = layer.training  # its parts keep their own train/eval flags
        converted.append((name, new))
    return converted
