"""What the adapters share: validating a converted layer for a mode."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .. import functional


def check_layer_for_mode(where: str, layer: nn.Module, mode: str) -> None:
    """Efficient mode runs a layer through our operators, which take only
    what they can compute exactly (see functional._check_layer)."""
    if mode == "efficient":
        try:
            functional._check_layer(where, layer, functional._has_bottleneck(layer))
        except ValueError as error:
            raise ValueError(f"convert: {error}; the model is unchanged") from None


def check_layer_names(path: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = list(block.named_children())
    if not layers:
        raise ValueError(f"convert: {path} has no layers")
    for index, (name, _) in enumerate(layers):
        if name != f"denselayer{index + 1}":
            where = f"{path}.{name}" if path else name
            raise ValueError(f"convert: {where}: expected child 'denselayer{index + 1}', got {name!r}")
    return layers


def library_layers(path: str, block: nn.Module, layer_class: type, description: str) -> list[tuple[str, nn.Module]]:
    """(where, layer) for each layer of a library's block, after checking
    their names and that each is a `layer_class` (`description` names it)."""
    checked = []
    for name, layer in check_layer_names(path, block):
        where = f"{path}.{name}" if path else name
        if type(layer) is not layer_class:
            raise ValueError(f"convert: {where} is a {type(layer).__qualname__}, not {description}; the model is unchanged")
        checked.append((where, layer))
    return checked


TRANSITION_PARTS = ("norm", "relu", "conv", "pool")


def parts_in_our_layout(module: nn.Module, classes: tuple[type, ...]) -> OrderedDict | None:
    """`module`'s children when it is one of `classes` and holds norm, relu,
    conv and pool, in that order (torchvision's and MONAI's transitions)."""
    if type(module) not in classes:
        return None
    parts = OrderedDict(module.named_children())
    return parts if tuple(parts) == TRANSITION_PARTS else None
