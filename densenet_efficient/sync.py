"""Synchronised BatchNorm for distributed training: batch statistics of the
global batch over a process group's ranks.

Efficient-mode dense blocks synchronise inside their operator (their
``sync_group``): statistics are merged across ranks with Chan's formula and
backward all-reduces the two per-channel gradient sums, as PyTorch's
SyncBatchNorm does. Every other BatchNorm (1-D, 2-D or 3-D) becomes
``nn.SyncBatchNorm`` on the devices it supports (CUDA) and ``SyncBatchNorm``
below on CPU (gloo), which ``nn.SyncBatchNorm`` refuses; it does the same with
differentiable all-reduces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .modules import DenseBlock

__all__ = ["SyncBatchNorm", "synchronize_batch_norm"]

# The BatchNorms synchronize_batch_norm replaces: exactly these types (a
# subclass may mean something else).
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _AllReduceSum(torch.autograd.Function):
    """The sum over the group's ranks of each rank's `x`, differentiably: every
    rank's result depends on every rank's x, so the gradient is the sum of the
    ranks' gradients, an all-reduce too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        summed = x.clone()
        dist.all_reduce(summed, group=group)
        return summed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = grad.clone()
        dist.all_reduce(summed, group=ctx.group)
        return summed, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm over [N, C, *spatial] inputs (1 to 3 spatial dimensions, or
    [N, C] as ``nn.BatchNorm1d``) whose batch statistics are those of the
    global batch of `group` (default: the world): ``nn.SyncBatchNorm`` for the
    CPU. Same parameters, buffers and state_dict as the BatchNorm it replaces."""

    def __init__(self, *args, group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions ([N, C, *spatial]), got {input.dim()}-D")

    @classmethod
    def from_batch_norm(cls, norm: nn.modules.batchnorm._BatchNorm, group=None) -> "SyncBatchNorm":
        """The same Parameter and buffer objects, synchronised."""
        return _sharing_tensors(cls(norm.num_features, norm.eps, norm.momentum, norm.affine,
                                    norm.track_running_stats, group=group, device="meta"), norm)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        uses_batch_stats = self.training or self.running_mean is None
        if not uses_batch_stats or not dist.is_initialized():
            return super().forward(input)
        group = self.group or dist.group.WORLD
        channels = input.shape[1]
        reduced = [0, *range(2, input.dim())]
        per_channel = (1, -1, *[1] * (input.dim() - 2))
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        local_count = torch.tensor([x.numel() // channels], dtype=x.dtype, device=x.device)
        # Chan's merge, differentiably: the global mean, then squared deviations from it.
        sums = _AllReduceSum.apply(torch.cat([local_count, x.sum(reduced)]), group)
        count, mean = sums[0], sums[1:] / sums[0]
        centered = x - mean.view(per_channel)
        var = _AllReduceSum.apply(centered.square().sum(reduced), group) / count
        if count.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count.item())} in the global batch")
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (count / (count - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        out = centered * torch.rsqrt(var + self.eps).view(per_channel)
        if self.affine:
            out = out * self.weight.view(per_channel) + self.bias.view(per_channel)
        return out.to(input.dtype)


def _sharing_tensors(synced: nn.modules.batchnorm._BatchNorm, norm: nn.modules.batchnorm._BatchNorm):
    """`synced` holding `norm`'s Parameter and buffer objects (an optimizer built
    before keeps updating them), in `norm`'s train/eval state."""
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(synced, name, getattr(norm, name))
    return synced.train(norm.training)


def _synchronized(norm: nn.modules.batchnorm._BatchNorm, group: dist.ProcessGroup) -> nn.Module:
    tensors = [t for t in (norm.running_mean, norm.weight) if t is not None]
    if not tensors or tensors[0].device.type == "cpu":
        return SyncBatchNorm.from_batch_norm(norm, group)
    return _sharing_tensors(nn.SyncBatchNorm(norm.num_features, norm.eps, norm.momentum, norm.affine,
                                             norm.track_running_stats, process_group=group, device="meta"), norm)


def synchronize_batch_norm(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Synchronises every BatchNorm of `model` over `group` (default: the
    world), in place: efficient-mode dense blocks through their operator, every
    other ``nn.BatchNorm1d``/``2d``/``3d`` by becoming an ``nn.SyncBatchNorm``
    (CPU: ``SyncBatchNorm``) with the same parameters and buffers (fused
    transitions and stems holding one then run their modules). Returns `model`."""
    group = group or dist.group.WORLD
    efficient = [m for m in model.modules() if isinstance(m, DenseBlock) and m.mode == "efficient"]
    inside_efficient = {id(n) for block in efficient for n in block.modules() if type(n) in _BATCH_NORMS}
    for block in efficient:
        block.sync_group = group.group_name
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _BATCH_NORMS and id(child) not in inside_efficient:
                setattr(parent, name, _synchronized(child, group))
    return model
