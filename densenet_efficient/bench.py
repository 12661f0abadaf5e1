"""``python -m densenet_efficient bench``: memory and speed of naive vs
checkpoint vs efficient (± recompute_bottleneck) vs torch.compile (of the
naive or the efficient model, optionally with a low activation memory
budget).

Every configuration runs in fresh subprocesses (so its peak memory is its
own, and running out of memory costs only that configuration). Per
configuration: memory (CUDA: ``max_memory_allocated`` over the timed steps;
CPU: bytes saved for backward, eager models only), the step peak (what a
step allocates above what stays resident between steps: CUDA from the
allocator's statistics; CPU from the resident-set high-water mark of a step
in a process of its own in which glibc hands large blocks back, while the
times come from another process left to glibc's own rules, as a training
script is), the analytic prediction (CUDA:
``estimate_training_step``; CPU: ``model_saved_bytes``, exact, without
autocast), the median and spread of the training-step time (forward +
backward + SGD, after warm-up, synchronized; p10-p90 from 10 steps on, else
min-max), and ratios to naive in the same precision and layout. ``--amp`` and
``--layouts`` run every model in each precision (fp32, or bf16/fp16 autocast)
and memory format (contiguous, channels_last) side by side; the report then
gives, per model and precision, the fastest efficient configuration against
the fastest naive one. Writes a table, results.json, results.md and PNG
plots (memory and step time against depth). Without ``--models``, rows follow the default
models: on CPU the whole densenet121 at 128×128, batch 8; and MONAI's
DenseNet121 on single-channel volumes (32³ on CPU, 96³ on a GPU), batch 2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .bench_configs import (
    CPU_DEFAULT, CUDA_DEFAULT, LAYOUTS, MODES, PERCENTILE_STEPS, PRECISIONS, input_shape, layout_of, _input_of,
)
from .bench_report import add_ratios, fastest_lines, max_batch_lines, plot, table

# --- one configuration, in a worker subprocess -------------------------------


def _process_memory(field: str) -> int:
    """A line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Sets this process's resident-set high-water mark (VmHWM) back to its
    current resident set (Linux: proc(5), /proc/pid/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


# The CPU memory worker starts with glibc serving every block of a page or
# more with mmap and handing it back to the system when it is freed, so that
# the resident set follows the live tensors. From 128 KiB instead, the blocks
# below it fragmented glibc's heap differently from process to process: five
# runs of one MONAI 3-D configuration read step peaks of 7.6 to 9.4 MiB
# (from a page: 7.8 to 8.1). That costs an mmap per allocation, which slows
# steps (densenet121 at 128², batch 8: naive 2×, efficient less), so the
# steps are timed in a worker of their own, under glibc's own rules (its
# thresholds then follow the largest blocks freed).
# Fixed thresholds instead (mmap from 32 MiB, trim above 64 MiB: the most
# glibc's rules can reach) made the timing depend on the heap's shape: an
# efficient densenet121 step freed a top of more than 64 MiB and faulted
# ~20,000 pages back in every step (~25 ms of 290), naive's fragmented heap
# never did.
BLOCKS_HANDED_BACK = {"MALLOC_MMAP_THRESHOLD_": str(4096)}


def step_statistics(times: list) -> dict:
    """The median step time and its spread: p10-p90 over enough steps,
    min-max over fewer."""
    ordered = sorted(times)
    percentiles = len(times) >= PERCENTILE_STEPS
    return {
        "step_ms": statistics.median(times),
        "step_ms_low": ordered[len(times) // 10] if percentiles else ordered[0],
        "step_ms_high": ordered[-1 - len(times) // 10] if percentiles else ordered[-1],
        "step_ms_spread": "p10-p90" if percentiles else "min-max",
        "step_ms_all": times,
    }


def merge_rounds(results: list) -> dict:
    """A configuration's rounds as one result: the memory of its first
    round (the saved bytes are exact, the same in every round) and the step
    times of all; the first failure if a round failed."""
    failed = [r for r in results if r.get("result") != "ok"]
    if failed:
        return failed[0]
    times = [t for r in results for t in r["step_ms_all"]]
    return dict(results[0], **step_statistics(times), rounds=len(results))


def measure(config: dict) -> dict:
    """One configuration's part in this process: on the CPU either its
    memory (``config["part"] == "memory"``) or its timed steps; on CUDA
    both."""
    import gc

    import torch

    from . import builders
    from .allocations import allocation_peak
    from .memory import estimate_training_step, model_saved_bytes, saved_tensor_bytes

    device = torch.device(config["device"])
    cuda = device.type == "cuda"
    memory_part = config.get("part") == "memory"
    variant = MODES[config["mode"]]
    shape = input_shape(config)
    torch.manual_seed(0)
    in_channels, spatial_dims = _input_of(config)
    model = builders.builder(config["model"])(
        mode=variant.mode, recompute_bottleneck=variant.recompute, spatial_dims=spatial_dims,
        in_channels=in_channels,
    ).to(device)
    autocast_dtype = PRECISIONS[config.get("precision", "fp32")]
    autocast_dtype = getattr(torch, autocast_dtype) if autocast_dtype else None
    memory_format = layout_of(config)
    model = model.to(memory_format=memory_format)
    # CPU: the saved bytes, predicted exactly without autocast only.
    prediction = (None if variant.compiled
                  else estimate_training_step(model, shape, autocast_dtype=autocast_dtype).total if cuda
                  else model_saved_bytes(model, shape) if memory_part and not autocast_dtype else None)
    if variant.memory_budget is not None:
        import torch._functorch.config

        torch._functorch.config.activation_memory_budget = variant.memory_budget
    runnable = torch.compile(model) if variant.compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(*shape, device=device).contiguous(memory_format=memory_format)
    batch = shape[0]
    y = torch.randint(0, 10, (batch,), device=device)
    state = [*model.parameters(), *model.buffers()]
    saved = []

    def step(count_saved=False):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if count_saved:
                logits, nbytes = saved_tensor_bytes(runnable, x, ignore=state)
                saved.append(nbytes)
            else:
                logits = runnable(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)

    if memory_part:
        # A step in which saved-tensor hooks count what eager autograd keeps
        # (not what a compiled graph keeps), one whose resident-set peak is
        # measured, and one whose allocations the profiler follows.
        step(count_saved=not variant.compiled)
        gc.collect()
        _reset_peak_rss()
        resident = _process_memory("VmRSS")
        step()
        # The kernel counts resident pages in per-CPU batches: a step that
        # allocates next to nothing (a tiny model) can read a few pages below
        # its start.
        step_peak = max(0, _process_memory("VmHWM") - resident)
        _, allocated_peak = allocation_peak(step)
        return {"result": "ok", "memory_bytes": saved[0] if saved else None,
                "memory_kind": "saved for backward (CPU)",
                "step_peak_bytes": step_peak, "step_allocated_bytes": allocated_peak,
                "predicted_bytes": prediction}
    try:
        for _ in range(config["warmup"]):
            step()
        synchronize()
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(config["steps"]):
            start = time.perf_counter()
            step()
            synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    except torch.cuda.OutOfMemoryError:
        return {"result": "OOM"}
    result = {"result": "ok", **step_statistics(times)}
    if cuda:
        result["memory_bytes"] = torch.cuda.max_memory_allocated(device)
        result["memory_kind"] = "peak allocated (CUDA)"
        result["step_peak_bytes"] = result["memory_bytes"] - resident
        result["predicted_bytes"] = prediction
    return result


def run_in_subprocess(config: dict, timeout: float) -> dict:
    """One part of a configuration (measure) in a fresh process; the CPU's
    memory part in one where glibc hands every block of a page or more back."""
    command = [sys.executable, "-m", "densenet_efficient", "bench", "--worker", json.dumps(config)]
    env = dict(os.environ, **BLOCKS_HANDED_BACK) if config.get("part") == "memory" else None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"result": f"timeout after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if done.returncode in (-9, 137) or "MemoryError" in done.stderr:
        return {"result": "OOM"}
    return {"result": "failed", "error": done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]}


def measure_configuration(config: dict, timeout: float, memory: bool = True) -> dict:
    """A configuration's timed steps and, with ``memory``, its memory: on
    the CPU from two processes (memory first), on CUDA from one."""
    if config["device"] != "cpu" or not memory:
        return run_in_subprocess(config, timeout)
    measured = run_in_subprocess(dict(config, part="memory"), timeout)
    if measured["result"] != "ok":
        return measured
    steps = run_in_subprocess(config, timeout)
    return dict(steps, **measured) if steps["result"] == "ok" else steps


def largest_batch(config: dict, timeout: float) -> int:
    """The largest batch whose training step runs on this GPU (doubling, then
    bisection; each probe in a fresh process)."""
    def runs(batch):
        probe = dict(config, batch=batch, steps=1, warmup=1)
        return run_in_subprocess(probe, timeout).get("result") == "ok"

    if not runs(1):
        return 0
    low, high = 1, 2
    while runs(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if runs(middle) else (low, middle)
    return low


# --- the sweep -----------------------------------------------------------------


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()
        self.tty = sys.stderr.isatty()

    def update(self, label: str) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {time.time() - self.start:5.0f}s {label}"
        print(("\r" + line.ljust(100)) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def advance(self, label: str) -> None:
        self.done += 1
        self.update(label)
        if self.done == self.total and self.tty:
            print(file=sys.stderr)


def environment(device: str) -> dict:
    import platform

    import torch

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device_type": device,
    }
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name(0)
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "unknown"
    return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--models", help="comma-separated: named builders, densenet_bc-<depth>-<k> or "
                        "monai:DenseNet121 (default: by device)")
    parser.add_argument("--modes", help=f"comma-separated from {list(MODES)} (default: by device)")
    parser.add_argument("--batch", help="comma-separated batch sizes (default: 4 on CPU, 64 on CUDA)")
    parser.add_argument("--input-size", type=int, help="side length; default: 32 for CIFAR models, 96 for volumes, 224 otherwise")
    parser.add_argument("--spatial-dims", type=int, choices=[1, 2, 3], default=2,
                        help="2: images [N, C, H, W]; 3: volumes [N, C, D, H, W]; 1: sequences")
    parser.add_argument("--in-channels", type=int, default=3, help="channels of the input (default 3)")
    parser.add_argument("--amp", default="fp32",
                        help=f"comma-separated precisions from {list(PRECISIONS)}: fp32 runs without autocast, the "
                        "others under torch.autocast in that dtype (default fp32)")
    parser.add_argument("--layouts", default="contiguous",
                        help=f"comma-separated memory formats of the model and its input, from {list(LAYOUTS)} "
                        "(channels_last: NHWC, NDHWC for volumes; default contiguous)")
    parser.add_argument("--channels-last", action="store_true", help="same as --layouts channels_last")
    parser.add_argument("--steps", type=int, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--max-batch", action="store_true", help="also find the largest batch that runs, per mode (GPU)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, taking turns, and report the median of all "
                        "their steps: a shared machine's slow spells then fall on every configuration alike "
                        "(default 1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--out", default="bench-output", help="directory for results.json, results.md and the plots")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.worker:
        print("RESULT " + json.dumps(measure(json.loads(args.worker))), flush=True)
        return
    import torch

    from . import builders

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.max_batch and device != "cuda":
        parser.error("--max-batch searches GPU memory; it needs --device cuda")
    defaults = CUDA_DEFAULT if device == "cuda" else CPU_DEFAULT
    names = args.models.split(",") if args.models else defaults["models"]
    modes = args.modes.split(",") if args.modes else defaults["modes"]
    for name in names:
        try:
            builders.builder(name)
        except ValueError as error:
            parser.error(str(error))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    try:
        batches = [int(b) for b in args.batch.split(",")] if args.batch else defaults["batch"]
    except ValueError:
        parser.error(f"--batch takes whole numbers, got {args.batch!r}")
    if any(b <= 0 for b in batches):
        parser.error(f"batch sizes must be positive, got {batches}")
    precisions = args.amp.split(",")
    layouts = ["channels_last"] if args.channels_last else args.layouts.split(",")
    for given, known, option in ((precisions, PRECISIONS, "--amp"), (layouts, LAYOUTS, "--layouts")):
        unknown = [name for name in given if name not in known]
        if unknown:
            parser.error(f"{option}: unknown {unknown}; choose from {list(known)}")
    if args.spatial_dims == 1 and "channels_last" in layouts:
        parser.error("--layouts channels_last: sequences ([N, C, L]) have no channels-last format")
    steps, warmup = args.steps or defaults["steps"], args.warmup if args.warmup is not None else defaults["warmup"]
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    env = environment(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every precision and layout of a model side by side, one process each.
    grid = [{"precision": precision, "layout": layout} for precision in precisions for layout in layouts]
    configs = []
    for name in names:
        size = args.input_size or builders.default_input_size(name, args.spatial_dims)
        for batch in batches:
            for variant in grid:
                for mode in modes:
                    configs.append({"model": name, "mode": mode, "batch": batch, "input_size": size,
                                    "spatial_dims": args.spatial_dims, "in_channels": args.in_channels,
                                    "device": device, "steps": steps, "warmup": warmup, **variant})
    for extra in defaults["extra"] if not args.models else []:
        if args.modes and "modes" in extra and extra["model"] in names:
            continue  # a row of more modes for a model the sweep runs: --modes said which
        if extra.get("needs") and importlib.util.find_spec(extra["needs"]) is None:
            print(f"no {extra['model']} row: {extra['needs']} is not installed", file=sys.stderr)
            continue
        row = {k: v for k, v in extra.items() if k not in ("modes", "needs")}
        configs += [dict(row, mode=mode, device=device, steps=steps, warmup=warmup, **variant)
                    for variant in grid for mode in (extra.get("modes", modes) if not args.modes else modes)]
    progress = Progress(len(configs) * args.rounds + (len(names) * len(modes) if args.max_batch else 0))
    results = [[] for _ in configs]
    for round_ in range(args.rounds):
        for config, done in zip(configs, results):
            label = f"{config['model']} {config['mode']}" + (f" (round {round_ + 1})" if args.rounds > 1 else "")
            progress.update(f"{label} batch {config['batch']}")
            done.append(measure_configuration(config, args.timeout, memory=round_ == 0))
            progress.advance(f"{label}: {done[-1].get('result')}")
    rows = [dict(config, **merge_rounds(done)) for config, done in zip(configs, results)]
    add_ratios(rows)
    report = {"environment": env, "rows": rows}
    if args.max_batch:  # per model given: {model: {mode: batch}}
        report["max_batch"] = {}
        for name in names:
            first = next(c for c in configs if c["model"] == name)
            report["max_batch"][name] = {}
            for mode in modes:
                report["max_batch"][name][mode] = largest_batch(dict(first, mode=mode), args.timeout)
                progress.advance(f"largest batch, {name} {mode}: {report['max_batch'][name][mode]}")

    text = table(rows)
    print(f"\n{env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date_utc']}\n")
    print(text)
    fastest = fastest_lines(rows)
    if fastest:
        print("\n" + "\n".join(fastest))
    if args.max_batch:
        print("\n" + "\n".join(max_batch_lines(report["max_batch"])))
    (out / "results.json").write_text(json.dumps(report, indent=1))
    markdown = [f"# Benchmark — {env['device']} — {env['date_utc']}", "",
                f"torch {env['torch']}, Python {env['python']}, commit `{env['commit']}`; "
                f"memory: {rows[0].get('memory_kind', 'n/a')}", "", table(rows, markdown=True), ""]
    if fastest:
        markdown += [*(f"- {line}" for line in fastest), ""]
    if args.max_batch:
        markdown += [*max_batch_lines(report["max_batch"]), ""]
    (out / "results.md").write_text("\n".join(markdown))
    plots = plot(rows, env, out)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in plots))
