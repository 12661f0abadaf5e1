"""``python -m densenet_efficient bench``: memory and speed of naive vs
checkpoint vs efficient (± recompute_bottleneck) vs torch.compile(naive).

Every configuration runs in a fresh subprocess (so its peak RSS is its own,
and running out of memory costs only that configuration). Per configuration:
memory (CUDA: ``max_memory_allocated`` over the timed steps; CPU: bytes saved
for backward and the subprocess's peak RSS), the analytic prediction (CUDA:
``estimate_training_step``; CPU: ``model_saved_bytes``, exact), the median
and spread of the training-step time (forward + backward + SGD, after
warm-up, synchronized), and ratios to naive. Writes a table, results.json,
results.md and PNG plots (memory and step time against depth). Without
``--models``, a 3-D row follows the default models: MONAI's DenseNet121 on
single-channel volumes (32³ on CPU, 96³ on a GPU), batch 2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {  # name: (block mode, recompute_bottleneck, torch.compile)
    "naive": ("naive", False, False),
    "checkpoint": ("checkpoint", False, False),
    "efficient": ("efficient", False, False),
    "efficient+recompute": ("efficient", True, False),
    "compiled-naive": ("naive", False, True),
}
CPU_DEFAULT = {
    "models": [f"densenet_bc-{depth}-12" for depth in (40, 100, 160, 250)],
    "modes": ["naive", "checkpoint", "efficient", "efficient+recompute"],
    "batch": [4],
    "steps": 3,
    "warmup": 1,
    "volume_size": 32,
}
CUDA_DEFAULT = {
    "models": ["densenet_bc_100_12", "densenet_bc_250_24", "densenet_bc_190_40", "densenet121", "densenet264"],
    "modes": list(MODES),
    "batch": [64],
    "steps": 20,
    "warmup": 5,
    "volume_size": 96,
}
# The default run's 3-D row (when MONAI is installed): MONAI's DenseNet121 on
# single-channel volumes of the device's volume_size, batch 2.
VOLUME_ROW = {"model": "monai:DenseNet121", "spatial_dims": 3, "in_channels": 1, "batch": 2}


def _input_of(config: dict) -> tuple[int, int]:
    """(channels, spatial dims) of a configuration's input; images of 3
    channels unless it says otherwise."""
    return config.get("in_channels", 3), config.get("spatial_dims", 2)


def input_shape(config: dict) -> tuple[int, ...]:
    """[N, C_in, *spatial] of a configuration's input."""
    channels, dims = _input_of(config)
    return (config["batch"], channels, *[config["input_size"]] * dims)


def input_label(config: dict) -> str:
    """The input of one sample, e.g. 3×32² or 1×32³."""
    channels, dims = _input_of(config)
    power = {1: "", 2: "²", 3: "³"}[dims]
    return f"{channels}×{config['input_size']}{power}"


def depth_of(model: str) -> int | None:
    match = re.search(r"(\d+)[-_](\d+)$", model)
    return int(match.group(1)) if match else None


# --- one configuration, in a worker subprocess -------------------------------


def measure(config: dict) -> dict:
    import resource

    import torch

    from . import models
    from .memory import estimate_training_step, model_saved_bytes, saved_tensor_bytes

    device = torch.device(config["device"])
    cuda = device.type == "cuda"
    mode, recompute, compiled = MODES[config["mode"]]
    shape = input_shape(config)
    torch.manual_seed(0)
    in_channels, spatial_dims = _input_of(config)
    model = models.builder(config["model"])(
        mode=mode, recompute_bottleneck=recompute, spatial_dims=spatial_dims, in_channels=in_channels,
    ).to(device)
    prediction = estimate_training_step(model, shape).total if cuda else model_saved_bytes(model, shape)
    runnable = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(*shape, device=device)
    batch = shape[0]
    y = torch.randint(0, 10, (batch,), device=device)
    state = [*model.parameters(), *model.buffers()]
    saved = []

    def step(count_saved=False):
        optimizer.zero_grad(set_to_none=True)
        if count_saved:
            logits, nbytes = saved_tensor_bytes(runnable, x, ignore=state)
            saved.append(nbytes)
        else:
            logits = runnable(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)

    try:
        for warmup in range(max(config["warmup"], 0 if cuda else 1)):
            step(count_saved=not cuda and warmup == 0)  # CPU: the first step also counts saved bytes
        synchronize()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(config["steps"]):
            start = time.perf_counter()
            step()
            synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    except torch.cuda.OutOfMemoryError:
        return {"result": "OOM"}
    result = {
        "result": "ok",
        "step_ms": statistics.median(times),
        "step_ms_p10": sorted(times)[len(times) // 10],
        "step_ms_p90": sorted(times)[-1 - len(times) // 10],
        "step_ms_all": times,
        "predicted_bytes": None if compiled else prediction,
    }
    if cuda:
        result["memory_bytes"] = torch.cuda.max_memory_allocated(device)
        result["memory_kind"] = "peak allocated (CUDA)"
    else:
        result["memory_bytes"] = saved[0]
        result["memory_kind"] = "saved for backward (CPU)"
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def run_in_subprocess(config: dict, timeout: float) -> dict:
    command = [sys.executable, "-m", "densenet_efficient", "bench", "--worker", json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"result": f"timeout after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if done.returncode in (-9, 137) or "MemoryError" in done.stderr:
        return {"result": "OOM"}
    return {"result": "failed", "error": done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]}


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


def add_ratios(rows: list[dict]) -> None:
    for row in rows:
        naive = next((r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"]
                      and r["mode"] == "naive" and r.get("result") == "ok"), None)
        if naive and row.get("result") == "ok":
            row["memory_vs_naive"] = row["memory_bytes"] / naive["memory_bytes"]
            row["step_vs_naive"] = row["step_ms"] / naive["step_ms"]


def table(rows: list[dict], markdown: bool = False) -> str:
    columns = ["model", "input", "batch", "mode", "memory MiB", "predicted MiB", "vs naive", "step ms (p10-p90)", "vs naive"]
    lines = []
    for r in rows:
        if r.get("result") != "ok":
            cells = [r["model"], input_label(r), str(r["batch"]), r["mode"], r.get("result", "?"), "", "", "", ""]
        else:
            predicted = "" if r.get("predicted_bytes") is None else f"{r['predicted_bytes'] / 2**20:.1f}"
            cells = [r["model"], input_label(r), str(r["batch"]), r["mode"], f"{r['memory_bytes'] / 2**20:.1f}", predicted,
                     f"{r.get('memory_vs_naive', float('nan')):.3f}",
                     f"{r['step_ms']:.1f} ({r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f})",
                     f"{r.get('step_vs_naive', float('nan')):.2f}"]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(c), *(len(cells[i]) for cells in lines)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*columns), "-" * (sum(widths) + 2 * len(widths))] + [fmt.format(*c) for c in lines])


def plot(rows: list[dict], env: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import models
    from .memory import estimate_training_step, model_saved_bytes

    ok = [r for r in rows if r.get("result") == "ok"]
    # A sweep over depth (with other rows, such as the 3-D one, left to the table) or, else, every model.
    by_depth = [r for r in ok if depth_of(r["model"])]
    sweep = bool(by_depth) and len({re.sub(r"\d+[-_]", "", r["model"], count=1) for r in by_depth}) == 1
    ok = by_depth if sweep else ok
    if not ok:
        return []
    subtitle = f"{env['device']} · torch {env['torch']} · {env['date_utc'][:10]}"
    paths = []
    for metric, ylabel, name in (("memory", "MiB", "memory_vs_depth.png"), ("step", "ms per step", "step_time_vs_depth.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for mode in dict.fromkeys(r["mode"] for r in ok):
            points = [r for r in ok if r["mode"] == mode]
            xs = [depth_of(r["model"]) if sweep else r["model"] for r in points]
            if metric == "memory":
                line, = ax.plot(xs, [r["memory_bytes"] / 2**20 for r in points], "o", label=f"{mode} (measured)")
                if sweep and points[0].get("predicted_bytes") is not None:
                    template = points[0]["model"]
                    family = re.sub(r"-\d+-", "-{}-", template)
                    first, last = min(xs), max(xs)
                    depths = list(range(first, last + 1, 6 if "bc" in family else 3))
                    predicted = []
                    for depth in depths:
                        import torch

                        with torch.device("meta"):
                            model = models.builder(family.format(depth))(
                                mode=MODES[mode][0], recompute_bottleneck=MODES[mode][1],
                                spatial_dims=_input_of(points[0])[1], in_channels=_input_of(points[0])[0])
                        shape = input_shape(points[0])
                        predicted.append((estimate_training_step(model, shape).total if env["device_type"] == "cuda"
                                          else model_saved_bytes(model, shape)) / 2**20)
                    ax.plot(depths, predicted, "-", color=line.get_color(), alpha=0.6, label=f"{mode} (model)")
            else:
                ax.errorbar(xs, [r["step_ms"] for r in points],
                            yerr=[[r["step_ms"] - r["step_ms_p10"] for r in points], [r["step_ms_p90"] - r["step_ms"] for r in points]],
                            marker="o", capsize=3, label=mode)
        kind = ok[0]["memory_kind"]
        ax.set_title(("Memory: " + kind if metric == "memory" else "Training-step time") + f"\n{subtitle}", fontsize=10)
        ax.set_xlabel("depth (DenseNet-BC)" if sweep else "model")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if not sweep:
            plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


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
    parser.add_argument("--steps", type=int, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--max-batch", action="store_true", help="also find the largest batch that runs, per mode (GPU)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--out", default="bench-output", help="directory for results.json, results.md and the plots")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.worker:
        print("RESULT " + json.dumps(measure(json.loads(args.worker))), flush=True)
        return
    import torch

    from . import models

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
            models.builder(name)
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
    steps, warmup = args.steps or defaults["steps"], args.warmup if args.warmup is not None else defaults["warmup"]

    env = environment(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = []
    for name in names:
        size = args.input_size or models.default_input_size(name, args.spatial_dims)
        for batch in batches:
            for mode in modes:
                configs.append({"model": name, "mode": mode, "batch": batch, "input_size": size,
                                "spatial_dims": args.spatial_dims, "in_channels": args.in_channels,
                                "device": device, "steps": steps, "warmup": warmup})
    if not args.models:
        if importlib.util.find_spec("monai") is None:
            print("no 3-D row: MONAI is not installed (pip install monai)", file=sys.stderr)
        else:
            configs += [dict(VOLUME_ROW, mode=mode, input_size=defaults["volume_size"], device=device, steps=steps,
                             warmup=warmup) for mode in modes]
    progress = Progress(len(configs) + (len(modes) if args.max_batch else 0))
    rows = []
    for config in configs:
        progress.update(f"{config['model']} {config['mode']} batch {config['batch']}")
        row = dict(config, **run_in_subprocess(config, args.timeout))
        rows.append(row)
        progress.advance(f"{config['model']} {config['mode']}: {row.get('result')}")
    add_ratios(rows)
    report = {"environment": env, "rows": rows}
    if args.max_batch:
        report["max_batch"] = {}
        for mode in modes:
            report["max_batch"][mode] = largest_batch(dict(configs[0], mode=mode), args.timeout)
            progress.advance(f"largest batch, {mode}: {report['max_batch'][mode]}")

    text = table(rows)
    print(f"\n{env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date_utc']}\n")
    print(text)
    if args.max_batch:
        print("\nlargest batch that runs (" + names[0] + "): " + ", ".join(f"{m} {b}" for m, b in report["max_batch"].items()))
    (out / "results.json").write_text(json.dumps(report, indent=1))
    markdown = [f"# Benchmark — {env['device']} — {env['date_utc']}", "",
                f"torch {env['torch']}, Python {env['python']}, commit `{env['commit']}`; "
                f"memory: {rows[0].get('memory_kind', 'n/a')}", "", table(rows, markdown=True), ""]
    if args.max_batch:
        markdown += ["Largest batch that runs (" + names[0] + "): " + ", ".join(f"{m} {b}" for m, b in report["max_batch"].items()), ""]
    (out / "results.md").write_text("\n".join(markdown))
    plots = plot(rows, env, out)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in plots))
