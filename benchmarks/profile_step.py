"""Where one CPU training step of a model spends its memory and time, from
torch.profiler's allocation events: the step's allocation peak (above what
was allocated when the step began) with the operator stack at that moment,
the allocations of 1 MiB or more just before it, and the time of chosen
operators.

    python benchmarks/profile_step.py --model densenet121 --input-size 128 --batch 16
    python benchmarks/profile_step.py --recompute --ops densenet_efficient::copy_with_stats

What it counts is what the CPU allocator hands out during the step; frees of
tensors allocated before it (the previous step's gradients) are not seen, so
read the peak as "allocated during the step, gradients included"."""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from densenet_efficient import builders
from densenet_efficient.allocations import allocation_events

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--mode", default="efficient")
    parser.add_argument("--recompute", action="store_true", help="recompute_bottleneck=True")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--ops", default="", help="comma-separated operator names to time")
    parser.add_argument("--before", type=int, default=30, help="allocations of >= 1 MiB to list before the peak")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = builders.builder(args.model)(mode=args.mode, recompute_bottleneck=args.recompute)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(args.batch, 3, args.input_size, args.input_size)
    y = torch.randint(0, 10, (args.batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    allocations = allocation_events(prof)
    live, peak, peak_index = 0, 0, 0
    running = []
    for i, (_, size, _) in enumerate(allocations):
        live += size
        running.append(live)
        if live > peak:
            peak, peak_index = live, i
    print(f"{args.model} {args.mode}{' +recompute' if args.recompute else ''}, batch {args.batch}, "
          f"{args.input_size}²: allocation peak {peak / MIB:.1f} MiB during the step, in")
    for name in allocations[peak_index][2]:
        print(f"    {name}")
    print(f"allocations of >= 1 MiB before the peak (live MiB, change, innermost operators):")
    shown = [i for i in range(peak_index + 1) if abs(allocations[i][1]) >= MIB][-args.before:]
    for i in shown:
        _, size, stack = allocations[i]
        print(f"  {running[i] / MIB:8.1f} {size / MIB:+7.1f}  {' > '.join(stack[-3:])}")

    if args.ops:
        wanted = set(args.ops.split(","))
        times = collections.Counter()
        for event in prof.events():
            if event.name in wanted:
                times[event.name] += event.cpu_time_total
        events = prof.events()
        step_us = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
        print(f"step {step_us / 1e3:.1f} ms (profiled)")
        for name in sorted(wanted):
            print(f"  {name}: {times[name] / 1e3:.2f} ms ({100 * times[name] / step_us:.2f}% of the step)")


if __name__ == "__main__":
    main()
