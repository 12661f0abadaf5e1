"""Where a CPU training step's time goes, naive against efficient, in one
process, and an estimate of the fastest the efficient step could be.

Times: the step and its optimizer part (medians of interleaved, unprofiled
steps), and from torch.profiler's self times (which add up to more than the
unprofiled step: the profiler's own cost per operator) four shares of the
step and their total:

- convolutions and GEMMs: ATen's (oneDNN, MKL) calls, the same FLOPs in
  both modes;
- per-channel work: BatchNorm, ReLU and concatenation (naive), our
  densenet_efficient operators' own time (efficient);
- optimizer: SGD's step and zero_grad, the same in both modes;
- the rest: ATen's views, copies and allocations (inside our operators
  too), pooling, the classifier, autograd, and Python between operators.

The shares come from a profile without record_shapes: with it the profiler
holds every operator's tensors until it stops, so no allocation reuses
freed memory and each operator that first writes a fresh output pays its
page faults (about 1 ms per 4 MB here; a densenet121 step took some 50×
the faults). The operators' shapes, for their bytes, come from one more
profiled step each that records them.

The floor is the efficient step with its convolutions and GEMMs as profiled
(long calls, which the profiler's per-operator cost barely inflates), its
optimizer as timed, its per-channel operators moving their least bytes (each
operand read or written once) at a streaming copy's bandwidth, and nothing
else, as a fraction of the naive (unprofiled) step: an estimate, not a
bound. Each per-channel operator's least bytes ÷ its time says how far from
that bandwidth it runs.

    python benchmarks/step_breakdown.py --model densenet121 --input-size 128 --batch 8 --layout channels_last
    python benchmarks/step_breakdown.py --model monai:DenseNet121 --spatial-dims 3 --in-channels 1 \\
        --input-size 32 --batch 2 --amp bf16
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from densenet_efficient import builders
from densenet_efficient.bench_configs import PRECISIONS, layout_of

LIBRARY_COMPUTE = {
    "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::mkldnn_convolution",
    "aten::convolution_backward", "aten::_convolution", "aten::convolution",
}
NAIVE_PER_CHANNEL = {
    "aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::_native_batch_norm_legit",
    "aten::_native_batch_norm_legit_no_training", "aten::threshold_backward", "aten::relu", "aten::relu_",
    "aten::clamp_min", "aten::clamp_min_", "aten::cat",
}
OPTIMIZER_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")
ELEMENT_SIZES = {"double": 8, "float": 4, "c10::BFloat16": 2, "c10::Half": 2}
STEP_LABEL = "step_breakdown: "
SHARES = ("convolutions and GEMMs", "per-channel work", "optimizer", "rest")

# How many times an operator must move a tensor the size of its first
# operand: each operand read or written once.
LEAST_PASSES = {
    "densenet_efficient::bn_relu_out": 2,  # read x, write y
    "densenet_efficient::bn_relu_backward": 3,  # read dy and x, write dx
    "densenet_efficient::bn_relu_backward_accumulate": 4,  # read dy and x, read and write dx
    "densenet_efficient::channel_stats_out": 1,  # read x
    "densenet_efficient::copy_with_stats": 2,  # read x, write its copy
}


def attribution(event) -> tuple[str | None, str]:
    """The mode whose step an operator ran in (None outside the steps) and
    which of SHARES its self time counts in."""
    if event.name.startswith(STEP_LABEL):  # its self time: Python between operators
        return event.name[len(STEP_LABEL):], "rest"
    mode, optimizer = None, event.name.startswith(OPTIMIZER_PREFIXES)
    ancestor = event.cpu_parent
    while ancestor is not None:
        if ancestor.name.startswith(OPTIMIZER_PREFIXES):
            optimizer = True
        if ancestor.name.startswith(STEP_LABEL):
            mode = ancestor.name[len(STEP_LABEL):]
        ancestor = ancestor.cpu_parent
    if optimizer:
        return mode, "optimizer"
    if event.name in LIBRARY_COMPUTE:
        return mode, "convolutions and GEMMs"
    if event.name in NAIVE_PER_CHANNEL or event.name.startswith("densenet_efficient::"):
        return mode, "per-channel work"
    return mode, "rest"


def streaming_copy_bandwidth() -> float:
    """Bytes per second of a 256 MiB float copy, the best of five."""
    source = torch.randn(2**26)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--spatial-dims", type=int, default=2)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--amp", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--layout", choices=("contiguous", "channels_last"), default="contiguous")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode, interleaved")
    parser.add_argument("--profiled-steps", type=int, default=3)
    args = parser.parse_args()
    if args.steps < 1 or args.profiled_steps < 1:
        parser.error(f"--steps and --profiled-steps must be at least 1, got {args.steps} and {args.profiled_steps}")

    config = {"spatial_dims": args.spatial_dims, "in_channels": args.in_channels, "layout": args.layout}
    memory_format = layout_of(config)
    autocast_dtype = PRECISIONS[args.amp] and getattr(torch, PRECISIONS[args.amp])
    shape = (args.batch, args.in_channels, *[args.input_size] * args.spatial_dims)

    def training_step(mode: str):
        torch.manual_seed(0)
        model = builders.builder(args.model)(
            mode=mode, spatial_dims=args.spatial_dims, in_channels=args.in_channels,
        ).to(memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        x = torch.randn(*shape).contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (args.batch,))

        def step() -> float:
            """Runs one step; returns the milliseconds its optimizer took."""
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            optimizer_time = time.perf_counter() - start
            with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            start = time.perf_counter()
            optimizer.step()
            return (optimizer_time + time.perf_counter() - start) * 1e3

        return step

    steps = {mode: training_step(mode) for mode in ("naive", "efficient")}
    for step in steps.values():
        step()
        step()
    times, optimizer_times = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(args.steps):
        for mode, step in steps.items():
            start = time.perf_counter()
            optimizer_times[mode].append(step())
            times[mode].append((time.perf_counter() - start) * 1e3)
    bandwidth = streaming_copy_bandwidth()

    def profiled(profiled_steps: int, record_shapes: bool):
        """The events of profiled steps, the modes taking turns, each step under its mode's label."""
        with profile(activities=[ProfilerActivity.CPU], record_shapes=record_shapes) as prof:
            for _ in range(profiled_steps):
                for mode, step in steps.items():
                    with record_function(STEP_LABEL + mode):
                        step()
        return prof.events()

    shares = {mode: collections.Counter() for mode in steps}
    per_channel_ms = collections.Counter()
    for event in profiled(args.profiled_steps, record_shapes=False):
        mode, share = attribution(event)
        if mode is None:
            continue
        shares[mode][share] += event.self_cpu_time_total / 1e3 / args.profiled_steps
        if event.name in LEAST_PASSES and mode == "efficient":
            per_channel_ms[event.name] += event.self_cpu_time_total / 1e3 / args.profiled_steps
    least_bytes = collections.Counter()
    for event in profiled(1, record_shapes=True):
        if event.name in LEAST_PASSES and attribution(event)[0] == "efficient":
            numel = 1
            for size in event.input_shapes[0]:
                numel *= size
            least_bytes[event.name] += LEAST_PASSES[event.name] * numel * ELEMENT_SIZES[event.input_dtypes[0]]

    step_ms = {mode: statistics.median(times[mode]) for mode in steps}
    print(f"{args.model} {'×'.join(map(str, shape))} {args.amp} {args.layout}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':10s} {'step ms':>8s} {'optimizer':>9s}  " + "  ".join(f"{name:>22s}" for name in SHARES)
          + f"  {'total':>8s}  (profiled, ms per step)")
    for mode in steps:
        print(f"{mode:10s} {step_ms[mode]:8.1f} {statistics.median(optimizer_times[mode]):9.1f}  "
              + "  ".join(f"{shares[mode][name]:22.1f}" for name in SHARES)
              + f"  {sum(shares[mode].values()):8.1f}")
    least_ms = sum(least_bytes.values()) / bandwidth * 1e3
    floor = (shares["efficient"]["convolutions and GEMMs"] + statistics.median(optimizer_times["efficient"])
             + least_ms)
    print(f"efficient ÷ naive: {step_ms['efficient'] / step_ms['naive']:.2f}; floor "
          f"{shares['efficient']['convolutions and GEMMs']:.1f} + {statistics.median(optimizer_times['efficient']):.1f}"
          f" + {least_ms:.1f} = {floor:.1f} ms, ÷ naive {floor / step_ms['naive']:.2f}")
    print(f"streaming copy: {bandwidth / 1e9:.1f} GB/s; per-channel operators, least bytes ÷ time:")
    for name, nbytes in sorted(least_bytes.items()):
        print(f"  {name:50s} {per_channel_ms[name]:7.1f} ms  {nbytes / 1e6:7.0f} MB  "
              f"{nbytes / per_channel_ms[name] / 1e6:5.1f} GB/s")

if __name__ == "__main__":
    main()
