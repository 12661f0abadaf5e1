"""`python -m densenet_efficient demo`: naive vs checkpoint vs efficient on one
dense block at a few depths on the CPU — bytes saved for backward (measured,
and the analytic model for efficient mode) and training-step time."""

from __future__ import annotations

import statistics
import time

import torch

from .memory import dense_block_saved_bytes, saved_tensor_bytes
from .modules import DenseBlock

DEPTHS = (8, 16, 32, 48)
MODES = ("naive", "checkpoint", "efficient")
NUM_INPUT_FEATURES, GROWTH_RATE, BN_SIZE = 24, 12, 4
BATCH, SIZE = 8, 16
TIMED_STEPS = 3


def _measure(num_layers: int, mode: str) -> tuple[int, float]:
    torch.manual_seed(0)
    block = DenseBlock(num_layers, NUM_INPUT_FEATURES, GROWTH_RATE, BN_SIZE, mode=mode)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.01, momentum=0.9)
    state = [*block.parameters(), *block.buffers()]
    x = torch.randn(BATCH, NUM_INPUT_FEATURES, SIZE, SIZE)
    saved, times = 0, []
    for step in range(1 + TIMED_STEPS):  # the first step warms up
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out, saved = saved_tensor_bytes(block, x, ignore=state)
        out.square().mean().backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    return saved, statistics.median(times)


def run() -> None:
    print(
        f"One dense block: {NUM_INPUT_FEATURES} input channels, growth rate {GROWTH_RATE}, "
        f"bn_size {BN_SIZE}; batch {BATCH}, {SIZE}x{SIZE}, float32, CPU "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}).\n"
        f"Saved = bytes autograd keeps for backward (parameters excluded); "
        f"step = forward + backward + SGD, median of {TIMED_STEPS}.\n"
    )
    header = f"{'layers':>6}  {'mode':<10}  {'saved MiB':>9}  {'vs naive':>8}  {'model MiB':>9}  {'step ms':>8}  {'vs naive':>8}"
    print(header)
    print("-" * len(header))
    for num_layers in DEPTHS:
        baseline = None
        for mode in MODES:
            saved, seconds = _measure(num_layers, mode)
            baseline = baseline or (saved, seconds)
            model = (
                f"{dense_block_saved_bytes(BATCH, SIZE, SIZE, NUM_INPUT_FEATURES, num_layers, GROWTH_RATE, BN_SIZE) / 2**20:9.2f}"
                if mode == "efficient"
                else f"{'':9}"
            )
            print(
                f"{num_layers:>6}  {mode:<10}  {saved / 2**20:9.2f}  {saved / baseline[0]:8.3f}  "
                f"{model}  {seconds * 1e3:8.1f}  {seconds / baseline[1]:8.2f}"
            )
