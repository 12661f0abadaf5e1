"""Times the CPU per-channel kernels against their ATen equivalents and a copy.

    .venv/bin/python benchmarks/cpu_kernels.py
"""

import statistics
import time

import torch
import torch.nn.functional as F

from densenet_efficient._ops import ops

SHAPES = [(8, 400, 16, 16), (64, 200, 32, 32)]


def milliseconds(fn, repeats=20):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms of 20")
    for shape in SHAPES:
        x = torch.randn(*shape)
        channels = shape[1]
        weight, bias = torch.rand(channels) + 0.5, torch.randn(channels) * 0.1
        mean, var = ops.channel_stats(x)
        invstd = torch.rsqrt(var + 1e-5)
        grad, grad_sum, scratch = torch.randn_like(x), torch.zeros_like(x), torch.empty_like(x)
        rows = [
            ("channel_stats", lambda: ops.channel_stats(x), "var_mean", lambda: torch.var_mean(x, (0, 2, 3))),
            ("bn_relu_out", lambda: ops.bn_relu_out(x, mean, invstd, weight, bias, scratch),
             "batch_norm+relu_", lambda: F.batch_norm(x, None, None, weight, bias, True).relu_()),
            ("bn_relu_backward_accumulate", lambda: ops.bn_relu_backward_accumulate(grad, x, mean, invstd, weight, bias, True, grad_sum),
             "native_batch_norm_backward", lambda: torch.ops.aten.native_batch_norm_backward(
                 grad, x, weight, None, None, mean, invstd, True, 1e-5, [True, True, True])),
        ]
        print(f"\n{list(shape)} float32, copy_ {milliseconds(lambda: scratch.copy_(x)):.2f} ms")
        for ours, ours_fn, theirs, theirs_fn in rows:
            print(f"  {ours:<28} {milliseconds(ours_fn):7.2f}   {theirs:<27} {milliseconds(theirs_fn):7.2f}")


if __name__ == "__main__":
    main()
