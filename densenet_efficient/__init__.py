"""densenet_efficient: DenseNet blocks whose training memory grows linearly
with depth, as drop-in replacements for torchvision's dense blocks."""

from . import _ops, functional, memory, reference  # noqa: F401  (_ops registers fake kernels and autograd)
from . import models
from .conversion import convert
from .modules import MODES, DenseBlock, DenseLayer

__all__ = ["MODES", "DenseBlock", "DenseLayer", "convert", "functional", "memory", "models", "reference"]
__version__ = "0.1.0"
