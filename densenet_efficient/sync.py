"""Synchronised BatchNorm for distributed training: batch statistics of the
global batch over a process group's ranks.

Efficient-mode dense blocks synchronise inside their operator (their
``sync_group``): statistics are merged across ranks with Chan's formula and
backward all-reduces the two per-channel gradient sums, as PyTorch's
SyncBatchNorm does. Every other BatchNorm becomes ``nn.SyncBatchNorm`` on the
devices it supports (CUDA) and ``SyncBatchNorm2d`` below on CPU (gloo), which
``nn.SyncBatchNorm`` refuses; it does the same with differentiable all-reduces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce

from .modules import DenseBlock

__all__ = ["SyncBatchNorm2d", "synchronize_batch_norm"]


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose batch statistics are those of the global batch
    of `group` (default: the world). Same parameters, buffers and state_dict."""

    def __init__(self, *args, group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    @classmethod
    def from_batch_norm(cls, norm: nn.BatchNorm2d, group=None) -> "SyncBatchNorm2d":
        """The same Parameter and buffer objects, synchronised."""
        return _sharing_tensors(cls(norm.num_features, norm.eps, norm.momentum, norm.affine,
                                    norm.track_running_stats, group=group, device="meta"), norm)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        uses_batch_stats = self.training or self.running_mean is None
        if not uses_batch_stats or not dist.is_initialized():
            return super().forward(input)
        group = self.group or dist.group.WORLD
        channels = input.shape[1]
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        local_count = torch.tensor([x.numel() // channels], dtype=x.dtype, device=x.device)
        # Chan's merge, differentiably: the global mean, then squared deviations from it.
        sums = all_reduce(torch.cat([local_count, x.sum((0, 2, 3))]), group=group)
        count, mean = sums[0], sums[1:] / sums[0]
        centered = x - mean.view(1, -1, 1, 1)
        var = all_reduce(centered.square().sum((0, 2, 3)), group=group) / count
        if count.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count.item())} in the global batch")
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (count / (count - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        out = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(input.dtype)


def _sharing_tensors(synced: nn.modules.batchnorm._BatchNorm, norm: nn.BatchNorm2d):
    """`synced` holding `norm`'s Parameter and buffer objects (an optimizer built
    before keeps updating them), in `norm`'s train/eval state."""
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(synced, name, getattr(norm, name))
    return synced.train(norm.training)


def _synchronized(norm: nn.BatchNorm2d, group: dist.ProcessGroup) -> nn.Module:
    tensors = [t for t in (norm.running_mean, norm.weight) if t is not None]
    if not tensors or tensors[0].device.type == "cpu":
        return SyncBatchNorm2d.from_batch_norm(norm, group)
    return _sharing_tensors(nn.SyncBatchNorm(norm.num_features, norm.eps, norm.momentum, norm.affine,
                                             norm.track_running_stats, process_group=group, device="meta"), norm)


def synchronize_batch_norm(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Synchronises every BatchNorm of `model` over `group` (default: the
    world), in place: efficient-mode dense blocks through their operator, every
    other ``nn.BatchNorm2d`` by becoming an ``nn.SyncBatchNorm`` (CPU:
    ``SyncBatchNorm2d``) with the same parameters and buffers. Returns `model`."""
    group = group or dist.group.WORLD
    efficient = [m for m in model.modules() if isinstance(m, DenseBlock) and m.mode == "efficient"]
    inside_efficient = {id(n) for block in efficient for n in block.modules() if isinstance(n, nn.BatchNorm2d)}
    for block in efficient:
        block.sync_group = group.group_name
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d and id(child) not in inside_efficient:
                setattr(parent, name, _synchronized(child, group))
    return model
