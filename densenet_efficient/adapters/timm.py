"""timm's DenseNets (``timm.models.densenet``: densenet121/161/169/201/264d,
densenetblur121d). Their layers hold norm1, conv1, norm2, conv2 with
``BatchNormAct2d`` norms (BatchNorm, then the activation, then a drop
module). A layer converts when each norm's activation is a ReLU and its drop
is the identity: the norm then computes exactly nn.BatchNorm2d + ReLU, which
our layer runs with the norm's very own Parameter and buffer objects (the
state_dict keys stay those of the norm)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..modules import DenseLayer
from ..sync import _sharing_tensors
from .common import check_layer_for_mode, library_layers

_PARTS = ("norm1", "conv1", "norm2", "conv2")


def _timm_classes() -> tuple[type, type, type, type] | None:
    try:
        from timm.layers import BatchNormAct2d
        from timm.models.densenet import DenseBlock, DenseLayer as TimmDenseLayer, DenseTransition
    except ImportError:
        return None
    return DenseBlock, TimmDenseLayer, BatchNormAct2d, DenseTransition


def block_classes() -> tuple[type, ...]:
    classes = _timm_classes()
    return (classes[0],) if classes else ()


def transition_parts(module: nn.Module) -> OrderedDict | None:
    """A DenseTransition (norm, conv, pool) whose norm is BatchNorm-ReLU
    and whose pool averages: as norm (a plain BatchNorm on the same
    tensors), relu, conv and pool. Others (a blur pool, another activation)
    stay as they are."""
    classes = _timm_classes()
    if classes is None or type(module) is not classes[3]:
        return None
    children = OrderedDict(module.named_children())
    if tuple(children) != ("norm", "conv", "pool") or _norm_problem(children["norm"]) is not None:
        return None
    if type(children["pool"]) is not nn.AvgPool2d:
        return None
    return OrderedDict(norm=_as_batch_norm(children["norm"]), relu=nn.ReLU(inplace=True), conv=children["conv"],
                       pool=children["pool"])


def _norm_problem(norm: nn.Module) -> str | None:
    """Why `norm` is not timm's BatchNormAct2d computing BatchNorm-ReLU, or
    None when it is."""
    batch_norm_act = _timm_classes()[2]
    if type(norm) is not batch_norm_act:
        return f"is a {type(norm).__qualname__}; expected timm's BatchNormAct2d"
    if type(norm.act) is not nn.ReLU or not isinstance(norm.drop, nn.Identity):
        return f"applies {norm.act!r} then {norm.drop!r}; only a ReLU with no drop (BatchNorm-ReLU) converts"
    return None


def _check_norm(where: str, norm: nn.Module) -> None:
    problem = _norm_problem(norm)
    if problem is not None:
        raise ValueError(f"convert: {where} {problem}; the model is unchanged")


def _as_batch_norm(norm: nn.Module) -> nn.BatchNorm2d:
    plain = nn.BatchNorm2d(
        norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats, device="meta"
    )
    return _sharing_tensors(plain, norm)


def _as_dense_layer(layer: nn.Module, mode: str) -> DenseLayer:
    converted = DenseLayer.__new__(DenseLayer)
    nn.Module.__init__(converted)
    converted.norm1 = _as_batch_norm(layer.norm1)
    converted.relu1 = nn.ReLU(inplace=True)
    converted.conv1 = layer.conv1
    converted.norm2 = _as_batch_norm(layer.norm2)
    converted.relu2 = nn.ReLU(inplace=True)
    converted.conv2 = layer.conv2
    converted.drop_rate = float(layer.drop_rate)
    converted.training = layer.training  # its parts keep their own train/eval flags
    converted.mode = mode
    return converted


def check(path: str, block: nn.Module, mode: str) -> None:
    _, timm_layer, _, _ = _timm_classes()
    for where, layer in library_layers(path, block, timm_layer, "timm's DenseLayer"):
        children = [child for child, _ in layer.named_children()]
        if children != list(_PARTS):
            raise ValueError(f"convert: {where} has submodules {children}, expected {list(_PARTS)}; the model is unchanged")
        for norm in ("norm1", "norm2"):
            _check_norm(f"{where}.{norm}", getattr(layer, norm))
        check_layer_for_mode(where, _as_dense_layer(layer, mode), mode)


def dense_layers(block: nn.Module, mode: str) -> list[tuple[str, DenseLayer]]:
    return [(name, _as_dense_layer(layer, mode)) for name, layer in block.named_children()]
