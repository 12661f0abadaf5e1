"""``convert``: swap our DenseBlock into an existing model, in place."""

from __future__ import annotations

from torch import nn

from . import functional
from .modules import DenseBlock, DenseLayer, _checked_mode
from .reference import ReferenceDenseBlock, ReferenceDenseLayer

__all__ = ["convert"]

_LAYER_PARTS = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")


def _torchvision_classes() -> tuple[type, type] | None:
    try:
        from torchvision.models.densenet import _DenseBlock, _DenseLayer
    except ImportError:
        return None
    return _DenseBlock, _DenseLayer


def _block_classes() -> tuple[type, ...]:
    tv = _torchvision_classes()
    return (DenseBlock, ReferenceDenseBlock) + ((tv[0],) if tv else ())


def _layer_classes() -> tuple[type, ...]:
    tv = _torchvision_classes()
    return (DenseLayer, ReferenceDenseLayer) + ((tv[1],) if tv else ())


def _check_block(path: str, block: nn.Module, mode: str) -> None:
    layer_classes = _layer_classes()
    if type(block) not in _block_classes():
        raise ValueError(f"convert: {path} is a {type(block).__name__}, a dense block class it does not know")
    layers = list(block.named_children())
    if not layers:
        raise ValueError(f"convert: {path} has no layers")
    for index, (name, layer) in enumerate(layers):
        where = f"{path}.{name}" if path else name
        if name != f"denselayer{index + 1}":
            raise ValueError(f"convert: {where}: expected child 'denselayer{index + 1}', got {name!r}")
        if type(layer) not in layer_classes:
            raise ValueError(
                f"convert: {where} is a {type(layer).__qualname__}, not a dense layer it can convert "
                f"(torchvision's _DenseLayer or densenet_efficient's DenseLayer); the model is unchanged"
            )
        extra = [child for child, _ in layer.named_children() if child not in _LAYER_PARTS]
        if extra:
            raise ValueError(f"convert: {where} has extra submodules {extra}; the model is unchanged")
        if mode == "efficient":
            try:
                functional._check_layer(where, layer, functional._has_bottleneck(layer))
            except ValueError as error:
                raise ValueError(f"convert: {error}; the model is unchanged") from None


def _as_dense_layer(layer: nn.Module, mode: str) -> DenseLayer:
    """Our DenseLayer around the very same submodules (and so the same
    Parameter and buffer objects)."""
    if type(layer) is DenseLayer:
        layer.mode = mode
        return layer
    converted = DenseLayer.__new__(DenseLayer)
    nn.Module.__init__(converted)
    for part in _LAYER_PARTS:
        if hasattr(layer, part):
            setattr(converted, part, getattr(layer, part))
    converted.drop_rate = float(layer.drop_rate)
    converted.train(layer.training)
    converted.mode = mode
    return converted


def _as_dense_block(block: nn.Module, mode: str, recompute_bottleneck: bool) -> DenseBlock:
    if type(block) is DenseBlock:
        converted = block
    else:
        converted = DenseBlock.__new__(DenseBlock)
        nn.ModuleDict.__init__(converted)
        for name, layer in block.named_children():
            converted.add_module(name, layer)
        converted.train(block.training)
    for name, layer in list(converted.named_children()):
        converted[name] = _as_dense_layer(layer, mode)
    converted.mode = mode
    converted.recompute_bottleneck = recompute_bottleneck
    return converted


def convert(model: nn.Module, mode: str = "efficient", recompute_bottleneck: bool = False) -> nn.Module:
    """Replaces, in place, every dense block of ``model`` — torchvision's
    ``_DenseBlock``, the reference's, or ours — by our ``DenseBlock`` in
    ``mode``, built from the very same submodules: parameters and buffers
    stay the same objects (an optimizer made before keeps working) and
    ``state_dict`` keys do not change. ``convert(model, mode="naive")`` goes
    back to torchvision's computation.

    Everything is checked before anything changes: a block it cannot convert
    (a custom layer, say) raises ValueError naming the module, and the model
    is left untouched. Returns ``model``, or the new block when ``model`` is
    itself a dense block.
    """
    _checked_mode(mode)
    blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, _block_classes())]
    # Blocks inside blocks are not a thing; a block's own layers are handled with it.
    for path, block in blocks:
        _check_block(path, block, mode)
    replacements = {path: _as_dense_block(block, mode, recompute_bottleneck) for path, block in blocks}
    for path, new_block in replacements.items():
        if not path:
            return new_block
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, new_block)
    return model
