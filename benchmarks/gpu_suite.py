"""The project's one GPU script, for a machine with a CUDA GPU, torch
preinstalled and no network:

    python3 benchmarks/gpu_suite.py [--stages build,tests,sanitizer,kernels,models] [--quick]
                                    [--bench-args "..."] [--tag NAME] [--commit SHA] [--out DIR]

Stages (each recorded even when it fails; later stages still run):
  build      pip install --no-build-isolation -e . for this GPU's architecture
  tests      the whole pytest suite, CUDA tests included (JUnit summary kept)
  sanitizer  compute-sanitizer memcheck and racecheck on a small efficient block forward+backward
  kernels    each per-channel kernel vs a device-to-device copy (GB/s, % of copy bandwidth)
             and vs ATen batch_norm + relu, on [64, 1000, 32, 32] float32 (and half/bfloat16)
  models     naive / checkpoint / efficient / efficient+recompute_bottleneck on CIFAR
             DenseNet-BC 100/12, 250/24, 190/40 at batch 64: peak memory and median step
             time (forward + backward + SGD, CUDA events, >= 20 timed steps after warm-up);
             OOM is recorded as OOM

Writes benchmarks/results/<UTC date>-<device>[-<tag>].json and .md (device, torch, CUDA,
cuDNN, commit, date, raw numbers, seconds per stage), and copies them into --out (default:
$OUT when set) after every stage, so a run killed at a time limit keeps the stages it finished.
Where one run would take too long, split it: e.g. `--stages build,tests,sanitizer,kernels
--tag checks`, then `--stages build,models --tag models --bench-args "--models densenet_bc_250_24"`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import shlex
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ALL_STAGES = ("build", "tests", "sanitizer", "kernels", "models")
SANITIZER_CASE = """
import torch, densenet_efficient as de
for dtype, size, drop, recompute in ((torch.float32, 8, 0.0, False), (torch.float16, 7, 0.2, True)):
    block = de.DenseBlock(3, 6, 4, drop_rate=drop, recompute_bottleneck=recompute).cuda().to(dtype)
    x = torch.randn(4, 6, size, size, device="cuda", dtype=dtype, requires_grad=True)
    block(x).float().square().mean().backward()
    block.eval()
    with torch.no_grad():
        block(x)
torch.cuda.synchronize()
print("sanitizer case ran")
"""


def run(command, log_name, work, timeout=None, env=None):
    """Runs a command, keeps its output in work/log_name, returns (rc, tail)."""
    log = work / log_name
    with open(log, "w") as f:
        try:
            rc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text()[-3000:]
    print(f"[{log_name}] rc={rc}\n{tail[-1500:]}", flush=True)
    return rc, tail


def stage_build(work):
    import torch

    env = dict(os.environ)
    major, minor = torch.cuda.get_device_capability(0)
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    env["DENSENET_EFFICIENT_CUDA"] = "1"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    rc, tail = run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                   "build.log", work, env=env)
    return {"rc": rc, "arch": env["TORCH_CUDA_ARCH_LIST"], "log_tail": tail[-1500:]}


def stage_tests(work):
    junit = work / "junit.xml"
    rc, tail = run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider",
                    f"--junitxml={junit}", "tests"], "tests.log", work)
    return {"rc": rc, "log_tail": tail[-2500:], **(junit_summary(junit) if junit.exists() else {})}


def junit_summary(junit):
    """Counts of a pytest JUnit file, and of its CUDA cases (by name) those failed and skipped."""
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    result = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    cuda_cases = [c for c in root.iter("testcase") if "cuda" in (c.get("classname", "") + c.get("name", ""))]
    result["cuda_cases"] = len(cuda_cases)
    result["cuda_failed"] = [c.get("classname") + "::" + c.get("name") for c in cuda_cases
                             if c.find("failure") is not None or c.find("error") is not None]
    result["cuda_skipped"] = sum(1 for c in cuda_cases if c.find("skipped") is not None)
    return result


def stage_sanitizer(work):
    case = work / "sanitizer_case.py"
    case.write_text(SANITIZER_CASE)
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    result = {}
    for check in ("memcheck", "racecheck"):
        rc, tail = run([tool, "--tool", check, "--error-exitcode", "1", sys.executable, str(case)],
                       f"sanitizer-{check}.log", work, timeout=900)
        result[check] = {"rc": rc, "clean": rc == 0 and "ERROR SUMMARY: 0 errors" in tail, "log_tail": tail[-1200:]}
    return result


def cuda_ms(fn, repeats=20, warmup=3):
    """Median milliseconds of fn over `repeats` runs, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def kernel_rows(shape, dtype):
    """Timings of every per-channel kernel on one shape and dtype."""
    import torch
    import torch.nn.functional as F

    from densenet_efficient._ops import ops

    x = torch.randn(shape, device="cuda", dtype=dtype)
    channels, nbytes = shape[1], x.numel() * x.element_size()
    weight = torch.rand(channels, device="cuda") + 0.5
    bias = torch.randn(channels, device="cuda") * 0.1
    mean, var = ops.channel_stats(x)
    invstd = torch.rsqrt(var + 1e-5)  # ATen's backward takes it
    mean_out, var_out = torch.empty_like(mean), torch.empty_like(var)
    grad, out, grad_sum = torch.randn_like(x), torch.empty_like(x), torch.zeros_like(x)
    copy_gbps = 2 * nbytes / cuda_ms(lambda: out.copy_(x))[0] / 1e6
    aten_weight, aten_bias = weight.to(dtype), bias.to(dtype)  # ATen wants one dtype throughout
    cases = [
        ("channel_stats", lambda: ops.channel_stats(x), nbytes,
         "var_mean", lambda: torch.var_mean(x, dim=(0, 2, 3))),
        ("copy_with_stats", lambda: ops.copy_with_stats(x, out, mean_out, var_out), 2 * nbytes,
         "copy_+var_mean", lambda: (out.copy_(x), torch.var_mean(out, dim=(0, 2, 3)))),
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
    rows = []
    for name, fn, bytes_moved, aten_name, aten_fn in cases:
        ms, samples = cuda_ms(fn)
        gbps = bytes_moved / ms / 1e6
        entry = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "kernel": name,
                 "ms": ms, "samples_ms": samples, "bytes": bytes_moved, "GB/s": gbps,
                 "copy_GB/s": copy_gbps, "fraction_of_copy": gbps / copy_gbps}
        if aten_fn is not None:
            entry["aten"] = aten_name
            entry["aten_ms"] = cuda_ms(aten_fn)[0]
        rows.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "samples_ms"}), flush=True)
    return rows


def stage_kernels(work, quick):
    import torch

    shapes = [(64, 1000, 32, 32)] if not quick else [(16, 256, 32, 32)]
    rows = []
    for shape in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            rows += kernel_rows(shape, dtype)
            torch.cuda.empty_cache()
    return rows


def stage_models(work, quick, bench_args):
    """The bench command on the GPU (its CUDA defaults: the paper's CIFAR
    DenseNet-BC at batch 64 and densenet121/264 at 224x224, every mode; or
    `bench_args`), then, with no `bench_args`, the largest batch per mode for
    BC-190-40."""
    out = work / "bench"
    command = [sys.executable, "-m", "densenet_efficient", "bench", "--device", "cuda", "--out", str(out)]
    if quick:
        command += ["--models", "densenet_bc_100_12", "--modes", "naive,efficient", "--steps", "5", "--warmup", "2"]
    command += bench_args
    rc, tail = run(command, "bench.log", work)
    result = {"rc": rc, "command": shlex.join(command[1:]), "log_tail": tail[-2000:]}
    if (out / "results.json").exists():
        result.update(json.loads((out / "results.json").read_text()))
    if not quick and not bench_args:
        command = [sys.executable, "-m", "densenet_efficient", "bench", "--device", "cuda", "--models",
                   "densenet_bc_190_40", "--modes", "naive,checkpoint,efficient,efficient+recompute",
                   "--steps", "2", "--warmup", "1", "--max-batch", "--out", str(work / "max-batch")]
        run(command, "max-batch.log", work)
        if (work / "max-batch" / "results.json").exists():
            result["max_batch"] = json.loads((work / "max-batch" / "results.json").read_text()).get("max_batch")
    return result


def environment(commit):
    import torch

    props = torch.cuda.get_device_properties(0)
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "device": torch.cuda.get_device_name(0),
        "capability": "%d.%d" % torch.cuda.get_device_capability(0),
        "multiprocessors": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": sys.version.split()[0],
    }


def markdown(report):
    env = report["environment"]
    lines = [f"# GPU suite — {env['device']} — {env['date_utc']}", "",
             f"commit `{env['commit']}`, torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
             f"Python {env['python']}", ""]
    stages = report["stages"]
    lines += ["seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()), ""]
    if "build" in stages:
        lines += [f"**build**: rc {stages['build']['rc']} (arch {stages['build']['arch']})", ""]
    if "tests" in stages:
        t = stages["tests"]
        lines += [f"**tests**: rc {t['rc']}; {t.get('tests')} tests, {t.get('failures')} failures, "
                  f"{t.get('errors')} errors, {t.get('skipped')} skipped; CUDA tests {t.get('cuda_cases')} "
                  f"({t.get('cuda_skipped')} skipped), failed: {t.get('cuda_failed') or 'none'}", ""]
    if "sanitizer" in stages:
        s = stages["sanitizer"]
        lines += ["**compute-sanitizer**: " + ", ".join(f"{k} {'clean' if v['clean'] else 'NOT clean (rc %s)' % v['rc']}"
                                                      for k, v in s.items()), ""]
    if "kernels" in stages:
        lines += ["## Kernels (median of 20, CUDA events)", "",
                  "| shape | dtype | kernel | ms | GB/s | % of copy | ATen op | ATen ms |", "|---|---|---|---|---|---|---|---|"]
        for r in stages["kernels"]:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['kernel']} | {r['ms']:.3f} | {r['GB/s']:.0f} | "
                         f"{100 * r['fraction_of_copy']:.0f}% | {r.get('aten', '')} | "
                         f"{r['aten_ms']:.3f} |" if "aten_ms" in r else
                         f"| {r['shape']} | {r['dtype']} | {r['kernel']} | {r['ms']:.3f} | {r['GB/s']:.0f} | "
                         f"{100 * r['fraction_of_copy']:.0f}% | | |")
        lines.append("")
    if "models" in stages:
        from densenet_efficient.bench import max_batch_lines, table

        m = stages["models"]
        lines += ["## Models", "", f"`python {m['command']}`: rc {m['rc']}", ""]
        if m.get("rows"):
            lines += [table(m["rows"], markdown=True), ""]
        if m.get("max_batch"):
            lines += [*max_batch_lines(m["max_batch"]), ""]
    return "\n".join(lines)


def write(report, stem, out, results=RESULTS):
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (results / f"{stem}.md").write_text(markdown(report))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".md"):
            shutil.copy(results / f"{stem}{suffix}", Path(out) / f"{stem}{suffix}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(ALL_STAGES))
    parser.add_argument("--quick", action="store_true", help="small shapes and few steps (a smoke run)")
    parser.add_argument("--bench-args", default="", help="extra arguments for the models stage's bench command")
    parser.add_argument("--tag", help="suffix of the results files' names (for a run split into parts)")
    parser.add_argument("--commit", help="commit to record (default: git rev-parse HEAD)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also copy the results here")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {ALL_STAGES}")
    if args.tag is not None and not args.tag.replace("-", "").replace("_", "").isalnum():
        parser.error(f"--tag takes letters, digits, '-' and '_'; got {args.tag!r}")

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA GPU visible")
    work = ROOT / "build" / "gpu_suite"
    work.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(args.commit), "quick": args.quick, "stages": {}, "seconds": {}}
    device = report["environment"]["device"].replace(" ", "-")
    stem = "-".join([report["environment"]["date_utc"][:10], device]
                    + (["quick"] if args.quick else []) + ([args.tag] if args.tag else []))
    runners = {
        "build": lambda: stage_build(work),
        "tests": lambda: stage_tests(work),
        "sanitizer": lambda: stage_sanitizer(work),
        # kernels and models import the extension: they run after the build
        "kernels": lambda: stage_kernels(work, args.quick),
        "models": lambda: stage_models(work, args.quick, shlex.split(args.bench_args)),
    }
    for stage in stages:
        print(f"=== {stage}", flush=True)
        started = time.monotonic()
        report["stages"][stage] = runners[stage]()
        report["seconds"][stage] = time.monotonic() - started
        write(report, stem, args.out)
    print(markdown(report))


if __name__ == "__main__":
    main()
