"""torchvision's ``_DenseBlock`` / ``_DenseLayer``, and the same structure in
densenet_efficient's reference and our own modules (re-converting ours
switches its mode)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..modules import DenseBlock, DenseLayer
from ..reference import ReferenceDenseBlock, ReferenceDenseLayer
from .common import check_layer_for_mode, check_layer_names, parts_in_our_layout

LAYER_PARTS = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")


def _torchvision_classes() -> tuple[type, type] | None:
    try:
        from torchvision.models.densenet import _DenseBlock, _DenseLayer
    except ImportError:
        return None
    return _DenseBlock, _DenseLayer


def block_classes() -> tuple[type, ...]:
    tv = _torchvision_classes()
    return (DenseBlock, ReferenceDenseBlock) + ((tv[0],) if tv else ())


def transition_parts(module: nn.Module) -> OrderedDict | None:
    from ..models import Transition

    try:
        from torchvision.models.densenet import _Transition
    except ImportError:
        return parts_in_our_layout(module, (Transition,))
    return parts_in_our_layout(module, (Transition, _Transition))


def _layer_classes() -> tuple[type, ...]:
    tv = _torchvision_classes()
    return (DenseLayer, ReferenceDenseLayer) + ((tv[1],) if tv else ())


def check(path: str, block: nn.Module, mode: str) -> None:
    for name, layer in check_layer_names(path, block):
        where = f"{path}.{name}" if path else name
        if isinstance(layer, DenseLayer):  # ours, in any library's layout: only its mode changes
            check_layer_for_mode(where, layer, mode)
            continue
        if type(layer) not in _layer_classes():
            raise ValueError(
                f"convert: {where} is a {type(layer).__qualname__}, not a dense layer it can convert "
                f"(torchvision's _DenseLayer or densenet_efficient's DenseLayer); the model is unchanged"
            )
        extra = [child for child, _ in layer.named_children() if child not in LAYER_PARTS]
        if extra:
            raise ValueError(f"convert: {where} has extra submodules {extra}; the model is unchanged")
        check_layer_for_mode(where, layer, mode)


def _as_dense_layer(layer: nn.Module, mode: str) -> DenseLayer:
    """Our DenseLayer around the very same submodules (and so the same
    Parameter and buffer objects)."""
    if isinstance(layer, DenseLayer):
        layer.mode = mode
        return layer
    converted = DenseLayer.__new__(DenseLayer)
    nn.Module.__init__(converted)
    for part in LAYER_PARTS:
        if hasattr(layer, part):
            setattr(converted, part, getattr(layer, part))
    converted.drop_rate = float(layer.drop_rate)
    converted.training = layer.training  # its parts keep their own train/eval flags
    converted.mode = mode
    return converted


def dense_layers(block: nn.Module, mode: str) -> list[tuple[str, DenseLayer]]:
    return [(name, _as_dense_layer(layer, mode)) for name, layer in block.named_children()]
