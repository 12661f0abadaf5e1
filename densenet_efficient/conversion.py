"""``convert``: swap our DenseBlock into an existing model, in place. The
dense blocks of each library are known to an adapter (``adapters/``)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .adapters import ADAPTERS
from .models import DenseNetFeatures, Transition
from .modules import DenseBlock, _checked_mode

__all__ = ["convert"]


def _dense_blocks(model: nn.Module) -> list[tuple[str, nn.Module, object]]:
    """Every dense block in `model` with the adapter that knows its class."""
    found = []
    for path, module in model.named_modules():
        for adapter in ADAPTERS:
            if type(module) in adapter.block_classes():
                found.append((path, module, adapter))
                break
    return found


def _known_block_classes() -> list[str]:
    names = [f"{c.__module__}.{c.__qualname__}" for adapter in ADAPTERS for c in adapter.block_classes()]
    return sorted(set(names))


def _as_dense_block(block: nn.Module, adapter, mode: str, recompute_bottleneck: bool) -> DenseBlock:
    layers = adapter.dense_layers(block, mode)
    if type(block) is DenseBlock:
        converted = block
    else:
        converted = DenseBlock.__new__(DenseBlock)
        nn.ModuleDict.__init__(converted)
        converted.train(block.training)
    for name, layer in layers:
        converted[name] = layer
    converted.mode = mode
    converted.recompute_bottleneck = recompute_bottleneck
    return converted


def convert(model: nn.Module, mode: str = "efficient", recompute_bottleneck: bool = False) -> nn.Module:
    """Replaces, in place, every dense block of ``model`` — torchvision's
    ``_DenseBlock``, timm's ``DenseBlock``, MONAI's ``_DenseBlock`` (1-D, 2-D
    or 3-D), the reference's, or ours — by our
    ``DenseBlock`` in ``mode``, built from the very same parameters and
    buffers: they stay the same objects (an optimizer made before keeps
    working) and ``state_dict`` keys do not change. ``convert(model,
    mode="naive")`` gives back the original computation.

    The transitions (torchvision's and MONAI's ``_Transition``: norm, relu,
    conv, pool; timm's ``DenseTransition`` with a BatchNorm-ReLU norm and
    average pooling, its norm split into a BatchNorm on the same tensors and
    a ReLU) become our ``Transition`` and a plain ``nn.Sequential`` that
    holds dense blocks (a ``features``) our ``DenseNetFeatures``, around the
    same modules and in the same mode: in efficient mode each transition and
    the stem's norm0-relu0-pool0 then run as one operator keeping only its
    input.

    Everything is checked before anything changes: a block it cannot convert
    (a custom layer, say) raises ValueError naming the module, and the model
    is left untouched; so does a model without any dense block it knows.
    Returns ``model``, or the new block when ``model`` is itself a dense block.
    """
    _checked_mode(mode)
    blocks = _dense_blocks(model)
    if not blocks:
        raise ValueError(
            f"convert: found no dense block to convert in this {type(model).__name__}; it looks for "
            f"{', '.join(_known_block_classes())} (timm's, MONAI's and torchvision's only when installed)"
        )
    # Blocks inside blocks are not a thing; a block's own layers are handled with it.
    for path, block, adapter in blocks:
        adapter.check(path, block, mode)
    replacements = {
        path: _as_dense_block(block, adapter, mode, recompute_bottleneck) for path, block, adapter in blocks
    }
    if "" in replacements:
        return replacements[""]
    _replace(model, replacements)
    _replace(model, {path: _as_container(module, Transition, mode, parts) for path, module, parts in _transitions(model)})
    _replace(model, {path: _as_container(module, DenseNetFeatures, mode) for path, module in _features(model)})
    return model


def _replace(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    for path, new in replacements.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, new)


def _transitions(model: nn.Module) -> list[tuple[str, nn.Module, OrderedDict]]:
    """(path, transition, its parts as norm, relu, conv, pool) for every
    transition an adapter knows."""
    found = []
    for path, module in model.named_modules():
        parts = next((p for adapter in ADAPTERS if (p := adapter.transition_parts(module)) is not None), None)
        if path and parts is not None:
            found.append((path, module, parts))
    return found


def _features(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Plain Sequentials (or ours) that directly hold a dense block."""
    return [
        (path, module) for path, module in model.named_modules()
        if path and type(module) in (nn.Sequential, DenseNetFeatures)
        and any(isinstance(child, DenseBlock) for child in module.children())
    ]


def _as_container(module: nn.Module, kind: type, mode: str, parts: OrderedDict | None = None) -> nn.Module:
    """A `kind` (a Sequential with a mode) holding `parts`, by default
    `module`'s very children."""
    if type(module) is kind:
        module.mode = mode
        return module
    container = kind.__new__(kind)
    nn.Sequential.__init__(container, parts if parts is not None else OrderedDict(module.named_children()))
    container.training = module.training  # its children keep their own train/eval flags
    for name, hooks in vars(module).items():  # the user's hooks on the container go along
        if "hooks" in name and isinstance(hooks, dict):
            vars(container)[name] = hooks
    container.mode = mode
    return container
