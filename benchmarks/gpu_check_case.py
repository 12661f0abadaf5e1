"""The case the GPU check runs under compute-sanitizer (memcheck; racecheck
with --quick): every per-channel operator of ours on every dtype the kernels
take and every layout they walk differently (planes, and the channel rows of
channels-last buffers), then the fused transition and stem, dense blocks
(dropout, recomputed bottlenecks, 1-D/2-D/3-D, eval), blocks under autocast,
and channels-last blocks, transition and stem. Shapes are tiny: the sanitizer makes each launch of our
kernels slow, not the others (its filter instruments ours alone).

    python3 benchmarks/gpu_check_case.py --device cuda [--quick]

It runs on CPU too (--device cpu), which is how CI rehearses it. Every
operator that writes into a view of a wider buffer must leave the rest of that
buffer as it was (NaN): a stray write fails the case even without a sanitizer.
Exit status 0 when everything ran and every check held."""

from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the tree, unless a densenet_efficient is importable

import densenet_efficient as de  # noqa: E402
from densenet_efficient import fused  # noqa: E402
from densenet_efficient._ops import math_dtype, ops  # noqa: E402
from densenet_efficient.models import Transition  # noqa: E402
from densenet_efficient.reference import BATCH_NORM, CONV, MAX_POOL  # noqa: E402

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# A single value per plane and 3 values in a 1-D plane (both shorter than a
# 16-byte vector of any dtype), an odd 2-D plane, a multiple of every vector
# width, a 3-D plane.
PLANES = ((1, 1), (3,), (5, 7), (8, 8), (2, 3, 2))
# Channels 3..3+C of a wider buffer (each sample's planes back to back, the
# block buffer's layout), the same one element off 16-byte alignment, and
# channels 3..3+C of a channels-last buffer (walked by channel rows, which
# take no vectors: aligned or not is all one to them).
LAYOUTS = ("slice", "misaligned", "rows")
QUICK = {"dtypes": (torch.float32, torch.float16), "planes": ((1, 1), (5, 7), (2, 3, 2)),
         "layouts": ("misaligned", "rows")}
# The "wide-rows" layout: 37 channels of a channels-last buffer over 16×16
# planes, so that the CUDA row kernels run several tiles of 32 channels (the
# last one partial) and several chunks of rows per channel.
WIDE = {"layout": "wide-rows", "plane": (16, 16), "channels": 37}
BATCH, CHANNELS, EXTRA_CHANNELS = 2, 3, 5
EPS = 1e-5


def _channels(layout: str) -> int:
    return WIDE["channels"] if layout == WIDE["layout"] else CHANNELS


def _layout_view(flat: torch.Tensor, layout: str, plane: tuple[int, ...]) -> torch.Tensor:
    """Channels 3..3+C of [N, C + 5, *plane] made of `flat` (from its second
    element for the misaligned layout; channels last for the row layouts)."""
    start = 1 if layout == "misaligned" else 0
    channels = _channels(layout)
    total = channels + EXTRA_CHANNELS
    values = flat[start : start + BATCH * total * math.prod(plane)]
    wide = values.view(BATCH, *plane, total).movedim(-1, 1) if layout.endswith("rows") else values.view(
        BATCH, total, *plane)
    return wide[:, 3 : 3 + channels]


def _flat_size(plane: tuple[int, ...], layout: str) -> int:
    return BATCH * (_channels(layout) + EXTRA_CHANNELS) * math.prod(plane) + 1


class Case:
    def __init__(self, device: torch.device):
        self.device = device
        self.generator = torch.Generator().manual_seed(0)
        self.operator_calls = 0
        self.module_steps = 0
        self.channels_last = False  # the modules' inputs

    def random(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        values = torch.randn(size, generator=self.generator, dtype=torch.float64) * 1.5 + 0.3
        return values.to(device=self.device, dtype=dtype)

    def input(self, layout: str, plane: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return _layout_view(self.random(_flat_size(plane, layout), dtype), layout, plane)

    def guarded(self, layout: str, plane, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A NaN buffer and the view of it an operator may write."""
        flat = torch.full((_flat_size(plane, layout),), float("nan"), dtype=dtype, device=self.device)
        return flat, _layout_view(flat, layout, plane)

    @staticmethod
    def check_untouched(flat: torch.Tensor, layout: str, plane, what: str) -> None:
        covered = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
        _layout_view(covered, layout, plane).fill_(True)
        if not flat[~covered].isnan().all():
            raise AssertionError(f"{what}: wrote outside its view ({layout}, plane {plane}, {flat.dtype})")

    def vectors(self, dtype: torch.dtype, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.rand(count, generator=self.generator, dtype=torch.float64) + 0.5
        bias = torch.randn(count, generator=self.generator, dtype=torch.float64) * 0.3
        return weight.to(self.device, dtype), bias.to(self.device, dtype)

    def per_channel_ops(self, dtype: torch.dtype, plane, layout: str) -> None:
        """Each per-channel operator once (the backward ones with batch and
        with running statistics, and in synchronised BatchNorm's two passes),
        reading views of `layout`, writing guarded views."""
        where = f"{dtype} plane {plane} {layout}"
        stats_dtype = math_dtype(dtype)
        channels = _channels(layout)
        x, grad = self.input(layout, plane, dtype), self.input(layout, plane, dtype)
        weight, bias = self.vectors(stats_dtype, channels)
        mean, var = ops.channel_stats(x)

        stats = torch.full((2, channels + 2), float("nan"), dtype=stats_dtype, device=self.device)
        ops.channel_stats_out(x, stats[0, 1:-1], stats[1, 1:-1])
        if not (torch.equal(stats[0, 1:-1], mean) and torch.equal(stats[1, 1:-1], var)):
            raise AssertionError(f"channel_stats_out differs from channel_stats ({where})")
        if not (stats[:, 0].isnan().all() and stats[:, -1].isnan().all()):
            raise AssertionError(f"channel_stats_out wrote outside its statistics ({where})")

        flat, copy = self.guarded(layout, plane, dtype)
        copy_stats = torch.empty((2, channels), dtype=stats_dtype, device=self.device)
        ops.copy_with_stats(x, copy, copy_stats[0], copy_stats[1])
        self.check_untouched(flat, layout, plane, "copy_with_stats")
        if not torch.equal(copy, x):
            raise AssertionError(f"copy_with_stats did not copy ({where})")

        y = ops.bn_relu(x, mean, var, weight, bias, EPS)
        flat, out = self.guarded(layout, plane, dtype)
        ops.bn_relu_out(x, mean, var, weight, bias, EPS, out)
        self.check_untouched(flat, layout, plane, "bn_relu_out")
        if not torch.equal(out, y) or not y.isfinite().all():
            raise AssertionError(f"bn_relu_out differs from bn_relu ({where})")

        for batch_stats in (True, False):
            grads = ops.bn_relu_backward(grad, x, mean, var, weight, bias, EPS, batch_stats)
            flat, total = self.guarded(layout, plane, dtype)
            total.zero_()
            ops.bn_relu_backward_accumulate(grad, x, mean, var, weight, bias, EPS, batch_stats, total)
            self.check_untouched(flat, layout, plane, "bn_relu_backward_accumulate")
            finite = all(t.isfinite().all() for t in (*grads, total))
            if not finite:
                raise AssertionError(f"bn_relu_backward: non-finite gradients ({where}, batch_stats={batch_stats})")

        # Synchronised BatchNorm's two passes apart (this batch as the global one).
        sums = ops.bn_relu_backward_sums(grad, x, mean, var, weight, bias, EPS)
        count = torch.tensor(BATCH * math.prod(plane), dtype=torch.int64, device=self.device)
        for accumulate in (False, True):
            flat, written = self.guarded(layout, plane, dtype)
            if accumulate:
                written.zero_()
            ops.bn_relu_backward_input(grad, x, mean, var, weight, bias, EPS, *sums, count, accumulate, written)
            self.check_untouched(flat, layout, plane, "bn_relu_backward_input")
            if not written.isfinite().all():
                raise AssertionError(f"bn_relu_backward_input: non-finite gradients ({where})")
        self.operator_calls += 12

        # Two norms reading one flat statistics vector at offsets, one with
        # momentum and one with a cumulative average.
        batch_mean, batch_var = torch.cat([mean, mean[:2]]), torch.cat([var, var[:2]])
        running_mean = [torch.zeros(n, dtype=stats_dtype, device=self.device) for n in (channels, 2)]
        running_var = [torch.ones(n, dtype=stats_dtype, device=self.device) for n in (channels, 2)]
        tracked = [torch.zeros((), dtype=torch.int64, device=self.device) for _ in range(2)]
        ops.update_running_stats(running_mean, running_var, tracked, [0.1, None], [0, channels], batch_mean,
                                 batch_var, count)
        if not all(int(t) == 1 for t in tracked) or not running_mean[1].isfinite().all():
            raise AssertionError(f"update_running_stats ({where})")
        self.operator_calls += 1

    def step(self, module: nn.Module, x: torch.Tensor) -> None:
        """Training forward + backward, then an eval forward (running
        statistics), in the memory format the case runs in."""
        module.train()
        if self.channels_last and x.dim() in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        x = x.detach().requires_grad_()
        out = module(x)
        out.float().square().mean().backward()
        if not (out.isfinite().all() and x.grad.isfinite().all()):
            raise AssertionError(f"{type(module).__name__}: non-finite output or gradient")
        module.eval()
        with torch.no_grad():
            module(x)
        self.module_steps += 1

    def transitions(self, dims_list) -> None:
        for dims in dims_list:
            transition = Transition(6, 3, spatial_dims=dims).to(self.device)
            if not transition.fused():
                raise AssertionError("the transition does not run fused")
            self.step(transition, self.random(2 * 6 * 4**dims, torch.float32).view(2, 6, *[4] * dims))

    def stems(self, dims_list) -> None:
        for dims in dims_list:
            parts = OrderedDict(conv0=CONV[dims](3, 8, 3, stride=2, padding=1, bias=False), norm0=BATCH_NORM[dims](8),
                                relu0=nn.ReLU(inplace=True), pool0=MAX_POOL[dims](3, stride=2, padding=1))
            if not fused.stem_fusable(*parts.values()):
                raise AssertionError("the stem is not fusable")
            features = de.models.DenseNetFeatures(parts, mode="efficient").to(self.device)
            self.step(features, self.random(2 * 3 * 9**dims, torch.float32).view(2, 3, *[9] * dims))

    def blocks(self, configurations) -> None:
        for drop_rate, recompute, dims in configurations:
            block = de.DenseBlock(3, 6, 4, drop_rate=drop_rate, recompute_bottleneck=recompute,
                                  spatial_dims=dims).to(self.device)
            self.step(block, self.random(2 * 6 * 5**dims, torch.float32).view(2, 6, *[5] * dims))

    def autocast(self, dtypes) -> None:
        for dtype in dtypes:
            with torch.autocast(self.device.type, dtype=dtype):
                self.blocks([(0.2, True, 2)])
                self.transitions([2])

    def in_channels_last(self, quick: bool) -> None:
        """Blocks, a transition and a stem fed channels-last inputs: their
        buffers channels last, walked by channel rows."""
        self.channels_last = True
        self.blocks([(0.2, True, 2)] if quick else [(0.2, True, 2), (0.0, False, 3)])
        self.transitions([2])
        self.stems([2])
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            self.blocks([(0.0, False, 2)])
        self.channels_last = False


def run(device: torch.device, quick: bool) -> Case:
    """The whole case; a line after each part, so that the log of a run
    stopped at its time limit shows how far it got."""
    case = Case(device)
    dtypes, planes, layouts = (QUICK["dtypes"], QUICK["planes"], QUICK["layouts"]) if quick else (
        DTYPES, PLANES, LAYOUTS)
    for dtype in dtypes:
        for plane in planes:
            for layout in layouts:
                case.per_channel_ops(dtype, plane, layout)
        if dtype != torch.float64:
            case.per_channel_ops(dtype, WIDE["plane"], WIDE["layout"])
        print(f"per-channel operators, {dtype}: done", flush=True)
    parts = [
        ("transitions", lambda: case.transitions([2] if quick else [1, 2, 3])),
        ("stems", lambda: case.stems([2] if quick else [2, 3])),
        ("blocks", lambda: case.blocks([(0.2, True, 2)] if quick else [
            (0.0, False, 2), (0.2, False, 2), (0.0, True, 2), (0.2, True, 3), (0.0, False, 1)])),
        ("autocast", lambda: case.autocast([torch.bfloat16] if quick else [torch.bfloat16, torch.float16])),
        ("channels last", lambda: case.in_channels_last(quick)),
    ]
    for name, part in parts:
        part()
        print(f"{name}: done", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return case


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--quick", action="store_true", help="a subset (for racecheck)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    case = run(torch.device(args.device), args.quick)
    print(f"check case on {args.device}{' (quick)' if args.quick else ''}: {case.operator_calls} operator calls, "
          f"{case.module_steps} module steps; every guard intact", flush=True)


if __name__ == "__main__":
    main()
