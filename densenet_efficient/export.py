"""What efficient modules do while a model is exported or traced.

An inference graph for deployment (``torch.export`` of a model in eval mode,
which the ONNX exporter uses too, or ``torch.jit.trace``) should hold only
ATen operators, which every exporter and runtime knows: there the efficient
dense blocks, transitions and stem run their modules one by one (naive mode,
the same function). An exported *training* graph (``torch.export`` in train
mode) keeps the efficient operators and their memory. A synchronised block's
statistics are its own rank's in such a graph; in eval mode they are the
running statistics either way."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["export_runs_modules"]


def export_runs_modules(module: nn.Module) -> bool:
    """Whether `module` (a dense layer or block, a transition, the features
    holding the stem) should run its modules one by one for an exporter."""
    return torch.jit.is_tracing() or (torch.compiler.is_exporting() and not module.training)
