"""The GPU check's measurements, each run by benchmarks/gpu_suite.py in a
process of its own (a hang or a crash then costs that process alone):

    python3 benchmarks/gpu_work.py TASK --device cuda|cpu --records FILE [options]

Tasks: environment, verify-build, smoke, kernels, model-row. Each appends its
results to FILE as JSON lines the moment it has them, so a process killed at
its time limit leaves what it finished. Exit status 1 when a check failed."""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # the tree, unless a densenet_efficient is importable already

# Where the CUDA tools are found when they are not on PATH (torch's wheels
# bring no cuobjdump; Triton's package carries one).
CUDA_BIN = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin"
# The C++ namespace of our kernels (csrc/cuda/): the sanitizer's filter is
# the kernels whose names contain it.
KERNEL_NAMESPACE = "densenet_efficient"


class Records:
    """JSON lines appended to a file, flushed one by one."""

    def __init__(self, path: str):
        self.path = path

    def add(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = CUDA_BIN / name
    if candidate.exists():
        return str(candidate)
    if name == "cuobjdump":
        try:
            import triton
        except ImportError:
            return None
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(bundled) if bundled.exists() else None
    return None


def tool_output(command: list[str], timeout: float = 5) -> str | None:
    """A tool's output (stripped), or None when it is absent or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def tool_version(name: str, pattern: str) -> str:
    tool = find_tool(name)
    output = tool_output([tool, "--version"]) if tool else None
    if output is None:
        return "absent"
    match = re.search(pattern, output)
    return match.group(0) if match else output.splitlines()[-1]


# --- environment ------------------------------------------------------------


def environment(device: str, records: Records) -> bool:
    import torch

    record = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "cuda_available": torch.cuda.is_available(),
        "nvcc": tool_version("nvcc", r"release [\d.]+, V[\d.]+"),
        "compute_sanitizer": tool_version("compute-sanitizer", r"\d{4}\.\d+\.\d+"),
    }
    smi = tool_output(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"])
    record["driver"] = smi.splitlines()[0].split(",")[0].strip() if smi else "absent"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update({
            "gpu": torch.cuda.get_device_name(0),
            "capability": "%d.%d" % torch.cuda.get_device_capability(0),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
        })
    else:
        record.update({"gpu": "none", "capability": "none", "gpu_memory_gib": None, "multiprocessors": None,
                       "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"})
    records.add(record)
    return True


# --- verify-build -----------------------------------------------------------


def verify_build(device: str, records: Records) -> bool:
    """The built extension loads, and on a GPU has CUDA kernels with machine
    code for this GPU."""
    import torch

    from densenet_efficient import _ops  # loads the extension
    from densenet_efficient.build_info import built_with, cuda_kernels_registered

    library = next(Path(_ops.__file__).parent.glob("_C*.so"), None)
    cuobjdump = find_tool("cuobjdump")
    listing = tool_output([cuobjdump, "-lelf", str(library)]) if cuobjdump and library else None
    symbols = tool_output([cuobjdump, "-symbols", str(library)]) if cuobjdump and library else None
    kernels = {line.split()[-1] for line in (symbols or "").splitlines() if "STO_ENTRY" in line}
    record = {
        "extension": library.name if library else None,
        "extension_mib": round(library.stat().st_size / 2**20, 1) if library else None,
        "built_with": built_with(),
        "cuda_kernels_registered": cuda_kernels_registered(),
        "machine_code": sorted(set(re.findall(r"sm_\d+a?", listing))) if listing else "unknown (no cuobjdump)",
        # The sanitizer checks only kernels it matches: all of ours must be.
        "kernels": len(kernels) if symbols else None,
        "kernels_the_sanitizer_filter_misses": sorted(k for k in kernels if KERNEL_NAMESPACE not in k),
    }
    ok = record["extension"] is not None and not record["kernels_the_sanitizer_filter_misses"]
    if device == "cuda":
        arch = "sm_%d%d" % torch.cuda.get_device_capability(0)
        record["gpu_arch"] = arch
        ok = ok and record["cuda_kernels_registered"] and (listing is None or arch in record["machine_code"])
    records.add(record)
    return ok


# --- smoke --------------------------------------------------------------------


def relative_error(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def smoke(device: str, records: Records) -> bool:
    """`info`, then an efficient and a naive block, forward and backward, in
    float32 (TF32 off) and float16, each against the float64 naive block: the
    efficient block passes when its error is at most twice the naive one's
    (plus a floor), as tests/test_cuda.py judges float32."""
    import torch

    import densenet_efficient as de
    from densenet_efficient import info

    records.add({"check": "info", "lines": info.lines()})
    torch.backends.cudnn.allow_tf32 = False
    floors = {torch.float32: 1e-6, torch.float16: 1e-3}
    ok = True
    for dtype, floor in floors.items():
        torch.manual_seed(0)
        efficient = de.DenseBlock(4, 16, 8, mode="efficient").to(device)
        naive = de.DenseBlock(4, 16, 8, mode="naive").to(device)
        naive.load_state_dict(efficient.state_dict())
        exact = de.DenseBlock(4, 16, 8, mode="naive").to(device, torch.float64)
        exact.load_state_dict(efficient.state_dict())
        x = torch.randn(8, 16, 12, 12, device=device, dtype=torch.float64)
        grad = torch.randn(8, 48, 12, 12, device=device, dtype=torch.float64)
        results = {}
        for name, block, run_dtype in (("efficient", efficient, dtype), ("naive", naive, dtype),
                                       ("exact", exact, torch.float64)):
            block.to(run_dtype)
            x_in = x.to(run_dtype).requires_grad_()
            out = block(x_in)
            out.backward(grad.to(run_dtype))
            results[name] = {"output": out.detach(), "input_grad": x_in.grad,
                             "conv_weight_grad": block.denselayer1.conv1.weight.grad}
        record = {"check": "block", "dtype": str(dtype).removeprefix("torch."), "device": device}
        for quantity in results["exact"]:
            mine = relative_error(results["efficient"][quantity], results["exact"][quantity])
            theirs = relative_error(results["naive"][quantity], results["exact"][quantity])
            record[quantity] = {"efficient": mine, "naive": theirs, "ok": mine <= 2 * theirs + floor}
            ok = ok and record[quantity]["ok"]
        records.add(record)
    return ok


# --- kernels ------------------------------------------------------------------


def timed_ms(fn, device: str, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn: CUDA events on a GPU, perf_counter on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def kernels(device: str, records: Records, shape: tuple[int, ...], repeats: int) -> bool:
    """Each per-channel kernel's bandwidth (the bytes it must move, each
    tensor once) as a fraction of a device-to-device copy's, and ATen's
    equivalent's time, per dtype and memory format (contiguous: the plane
    walk; channels last: the channel-row walk). A failing ATen reference is
    recorded, not counted as a failure; a failing kernel of ours is."""
    import torch
    import torch.nn.functional as F

    from densenet_efficient._ops import ops

    ok = True
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    layouts = [("contiguous", torch.contiguous_format)] + ([("channels_last", channels_last)] if channels_last else [])
    for (layout, memory_format), dtype in itertools.product(layouts, (torch.float32, torch.float16, torch.bfloat16)):
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        channels, nbytes = shape[1], x.numel() * x.element_size()
        weight = torch.rand(channels, device=device) + 0.5
        bias = torch.randn(channels, device=device) * 0.1
        mean, var = ops.channel_stats(x)
        invstd = torch.rsqrt(var + 1e-5)  # ATen's backward takes it
        mean_out, var_out = torch.empty_like(mean), torch.empty_like(var)
        grad, out, grad_sum = torch.randn_like(x), torch.empty_like(x), torch.zeros_like(x)
        copy_gbps = 2 * nbytes / timed_ms(lambda: out.copy_(x), device, repeats) / 1e6
        aten_weight, aten_bias = weight.to(dtype), bias.to(dtype)  # ATen wants one dtype throughout
        dims = (0, *range(2, x.dim()))
        cases = [
            ("channel_stats", lambda: ops.channel_stats(x), nbytes,
             "var_mean", lambda: torch.var_mean(x, dim=dims)),
            ("copy_with_stats", lambda: ops.copy_with_stats(x, out, mean_out, var_out), 2 * nbytes,
             "copy_+var_mean", lambda: (out.copy_(x), torch.var_mean(out, dim=dims))),
            ("bn_relu_out (forward)", lambda: ops.bn_relu_out(x, mean, var, weight, bias, 1e-5, out), 2 * nbytes,
             "batch_norm(training)+relu_", lambda: F.batch_norm(x, None, None, aten_weight, aten_bias, True).relu_()),
            ("bn_relu_backward (new grad)", lambda: ops.bn_relu_backward(grad, x, mean, var, weight, bias, 1e-5, True),
             3 * nbytes, "native_batch_norm_backward",
             lambda: torch.ops.aten.native_batch_norm_backward(
                 grad, x, aten_weight, None, None, mean, invstd, True, 1e-5, [True, True, True])),
            ("bn_relu_backward_accumulate",
             lambda: ops.bn_relu_backward_accumulate(grad, x, mean, var, weight, bias, 1e-5, True, grad_sum),
             4 * nbytes, None, None),
        ]
        for name, fn, bytes_moved, aten_name, aten_fn in cases:
            row = {"shape": list(shape), "layout": layout, "dtype": str(dtype).removeprefix("torch."), "kernel": name,
                   "bytes": bytes_moved, "copy_GB/s": copy_gbps, "repeats": repeats}
            try:
                row["ms"] = timed_ms(fn, device, repeats)
                row["GB/s"] = bytes_moved / row["ms"] / 1e6
                row["fraction_of_copy"] = row["GB/s"] / copy_gbps
            except RuntimeError as error:
                row["error"] = str(error).splitlines()[0]
                ok = False
            if aten_fn is not None:
                row["aten"] = aten_name
                try:
                    row["aten_ms"] = timed_ms(aten_fn, device, repeats)
                except RuntimeError as error:
                    row["aten_error"] = str(error).splitlines()[0]
            records.add(row)
        del x, grad, out, grad_sum
        if device == "cuda":
            torch.cuda.empty_cache()
    return ok


# --- model-row ----------------------------------------------------------------

AUTOCAST = {"fp32": None, "bf16": "bfloat16"}


def model_row(device: str, records: Records, model_name: str, batch: int, mode: str, precision: str,
              seconds: float, max_steps: int) -> bool:
    """One training configuration (SGD with momentum, cross-entropy, CIFAR
    input): peak allocated memory over the timed steps beside the plan's
    prediction, and the median step time. As many timed steps as fit in
    `seconds` (at least 3, at most max_steps), judged from the warm-up."""
    started = time.perf_counter()
    import torch

    from densenet_efficient import builders
    from densenet_efficient.memory import estimate_training_step

    cuda = device == "cuda"
    autocast_dtype = getattr(torch, AUTOCAST[precision]) if AUTOCAST[precision] else None
    base_mode, recompute = mode.split("+")[0], mode.endswith("+recompute")
    torch.manual_seed(0)
    model = builders.builder(model_name)(mode=base_mode, recompute_bottleneck=recompute).to(device)
    shape = (batch, 3, builders.default_input_size(model_name), builders.default_input_size(model_name))
    predicted = estimate_training_step(model, shape, autocast_dtype=autocast_dtype).total
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    row = {"model": model_name, "batch": batch, "mode": mode, "precision": precision, "device": device,
           "predicted_bytes": predicted}

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    try:
        warmup = []
        for _ in range(2):  # the first creates the momentum buffers and picks cuDNN's algorithms
            begun = time.perf_counter()
            step()
            synchronize()
            warmup.append(time.perf_counter() - begun)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        left = seconds - (time.perf_counter() - started)
        steps = max(3, min(max_steps, int(left / max(warmup[-1], 1e-6))))
        row["step_ms"] = timed_ms(step, device, repeats=steps, warmup=0)
        row["steps"] = steps
    except torch.cuda.OutOfMemoryError:
        row["result"] = "OOM"
        records.add(row)
        return True  # a measurement, not a failure of the check
    row["result"] = "ok"
    if cuda:
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_vs_predicted"] = row["peak_bytes"] / predicted
    records.add(row)
    return True


# --- command line -------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["environment", "verify-build", "smoke", "kernels", "model-row"])
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--records", required=True, help="file the results are appended to, as JSON lines")
    parser.add_argument("--shape", default="64,1000,32,32", help="kernels: the input's shape")
    parser.add_argument("--repeats", type=int, default=20, help="kernels: timed runs per kernel")
    parser.add_argument("--model", default="densenet_bc_250_24")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mode", default="efficient", choices=["naive", "efficient", "efficient+recompute"])
    parser.add_argument("--precision", default="fp32", choices=sorted(AUTOCAST))
    parser.add_argument("--seconds", type=float, default=20, help="model-row: time to fill with timed steps")
    parser.add_argument("--max-steps", type=int, default=30)
    args = parser.parse_args(argv)
    records = Records(args.records)
    if args.task == "environment":
        ok = environment(args.device, records)
    elif args.task == "verify-build":
        ok = verify_build(args.device, records)
    elif args.task == "smoke":
        ok = smoke(args.device, records)
    elif args.task == "kernels":
        ok = kernels(args.device, records, tuple(int(n) for n in args.shape.split(",")), args.repeats)
    else:
        ok = model_row(args.device, records, args.model, args.batch, args.mode, args.precision, args.seconds,
                       args.max_steps)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
