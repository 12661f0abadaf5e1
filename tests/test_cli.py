"""The command line: ``bench`` (smoke run with a tiny configuration) and
``plan`` (predictions, largest batch, argument errors)."""

import json
import statistics
import subprocess
import sys

import pytest
import torch

from densenet_efficient import models
from densenet_efficient.__main__ import main
from densenet_efficient.memory import estimate_training_step
from densenet_efficient.arguments import parse_memory
from densenet_efficient.plan import largest_batch


def test_bench_smoke_writes_table_json_markdown_and_plots(tmp_path):
    out = tmp_path / "bench"
    command = [
        sys.executable, "-m", "densenet_efficient", "bench", "--device", "cpu",
        "--models", "densenet_bc-10-4,densenet_bc-16-4", "--modes", "naive,efficient,efficient+recompute",
        "--batch", "2", "--steps", "2", "--warmup", "1", "--out", str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "efficient+recompute" in done.stdout and "vs naive" in done.stdout
    report = json.loads((out / "results.json").read_text())
    assert report["environment"]["device_type"] == "cpu" and report["environment"]["torch"] == torch.__version__
    rows = report["rows"]
    assert len(rows) == 6 and all(r["result"] == "ok" for r in rows)
    for r in rows:  # on CPU the prediction is exact
        assert r["memory_bytes"] == r["predicted_bytes"] and r["step_peak_bytes"] >= 0 and len(r["step_ms_all"]) == 2
        assert r["step_ms_spread"] == "min-max"  # 2 steps: no percentiles
    naive, efficient = (next(r for r in rows if r["model"] == "densenet_bc-16-4" and r["mode"] == m) for m in ("naive", "efficient"))
    assert efficient["memory_vs_naive"] < 1 and naive["memory_vs_naive"] == 1
    assert "| densenet_bc-10-4 | 3×32² | 2 | naive |" in (out / "results.md").read_text()
    for name in ("memory_vs_depth.png", "step_time_vs_depth.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_runs_precisions_and_layouts_side_by_side(tmp_path):
    """--amp and --layouts: every model in each precision and memory format,
    ratios to naive within the same precision and layout, and per precision
    the fastest efficient configuration against the fastest naive one."""
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "densenet_efficient", "bench", "--device", "cpu", "--models", "densenet_bc-10-4",
               "--modes", "naive,efficient", "--batch", "2", "--steps", "1", "--warmup", "1", "--amp", "fp32,bf16",
               "--layouts", "contiguous,channels_last", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    grid = [(r["precision"], r["layout"], r["mode"]) for r in rows]
    assert grid == [(p, layout, m) for p in ("fp32", "bf16") for layout in ("contiguous", "channels_last")
                    for m in ("naive", "efficient")] and all(r["result"] == "ok" for r in rows)
    for r in rows:
        assert r["step_vs_naive"] == pytest.approx(r["step_ms"] / next(
            n["step_ms"] for n in rows if (n["precision"], n["layout"], n["mode"]) == (r["precision"], r["layout"], "naive")))
        # Exact predictions without autocast only; channels-last efficient saves what contiguous does.
        assert (r["predicted_bytes"] == r["memory_bytes"]) if r["precision"] == "fp32" else r["predicted_bytes"] is None
    for precision in ("fp32", "bf16"):
        saved = {r["memory_bytes"] for r in rows if r["precision"] == precision and r["mode"] == "efficient"}
        assert len(saved) == 1, saved
        assert f"batch 2 {precision}: fastest efficient (efficient, " in done.stdout
    assert "| densenet_bc-10-4 | 3×32² | 2 | efficient | bf16 | NHWC |" in (out / "results.md").read_text()


def test_bench_rounds_take_turns_and_pool_their_steps(tmp_path):
    """--rounds 2: each configuration runs twice, after every other one
    has run once; its row holds the steps of both rounds."""
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "densenet_efficient", "bench", "--device", "cpu", "--models", "densenet_bc-10-4",
               "--modes", "naive,efficient", "--batch", "2", "--steps", "2", "--warmup", "0", "--rounds", "2",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["naive", "efficient"]
    for r in rows:
        assert r["rounds"] == 2 and len(r["step_ms_all"]) == 4
        assert r["step_ms"] == pytest.approx(statistics.median(r["step_ms_all"]))
    order = [line.split("s ", 1)[-1].split(" batch")[0] for line in done.stderr.splitlines() if "batch 2" in line]
    assert order == ["densenet_bc-10-4 naive (round 1)", "densenet_bc-10-4 efficient (round 1)",
                     "densenet_bc-10-4 naive (round 2)", "densenet_bc-10-4 efficient (round 2)"], order


def test_step_peak_is_the_resident_high_water_mark_since_its_reset():
    """The CPU step peak: 64 MiB allocated and freed after the reset shows."""
    from densenet_efficient.bench import _process_memory, _reset_peak_rss

    transient = torch.empty(64 * 2**20, dtype=torch.uint8)
    del transient
    _reset_peak_rss()
    before = _process_memory("VmRSS")
    assert _process_memory("VmHWM") - before < 16 * 2**20  # the earlier peak is gone
    transient = torch.ones(64 * 2**20, dtype=torch.uint8)
    del transient
    assert _process_memory("VmHWM") - before >= 63 * 2**20


def test_bench_measures_cpu_memory_and_times_in_separate_processes():
    """The memory from a process where glibc hands every block of a page or
    more back, the times from one left to glibc's own rules; a row holds
    both. Maps of 32² at batch 4, so that the step peak stands well above
    what the kernel's batched resident-set counters can be off by. The
    allocated peak (the profiler's) is the same in another process."""
    from densenet_efficient.bench import measure_configuration, run_in_subprocess

    config = {"model": "densenet_bc-10-4", "mode": "efficient", "batch": 4, "input_size": 32, "device": "cpu",
              "steps": 2, "warmup": 1}
    memory = run_in_subprocess(dict(config, part="memory"), timeout=300)
    assert memory["result"] == "ok" and memory["memory_bytes"] == memory["predicted_bytes"] > 0
    assert memory["step_peak_bytes"] > 0 and "step_ms" not in memory
    assert memory["step_allocated_bytes"] > 0
    steps = run_in_subprocess(config, timeout=300)
    assert steps["result"] == "ok" and len(steps["step_ms_all"]) == 2 and "memory_bytes" not in steps
    row = measure_configuration(config, timeout=300)
    assert row["memory_bytes"] == memory["memory_bytes"] and len(row["step_ms_all"]) == 2
    assert row["step_allocated_bytes"] == memory["step_allocated_bytes"]


def test_bench_runs_a_compiled_model_with_a_low_memory_budget():
    from densenet_efficient.bench import measure_configuration

    result = measure_configuration({"model": "densenet_bc-10-4", "mode": "compiled-naive-lowmem", "batch": 2,
                                    "input_size": 16, "device": "cpu", "steps": 1, "warmup": 1}, timeout=600)
    assert result["result"] == "ok", result
    # Saved-tensor hooks do not see what a compiled graph keeps: no figure rather than a wrong one.
    assert result["memory_bytes"] is None and result["predicted_bytes"] is None and result["step_peak_bytes"] >= 0


def test_bench_records_a_failed_configuration_and_goes_on():
    from densenet_efficient.bench import measure_configuration

    result = measure_configuration({"model": "densenet_bc-10-4", "mode": "efficient", "batch": 1, "input_size": 1,
                                    "device": "cpu", "steps": 1, "warmup": 1}, timeout=300)
    assert result["result"] == "failed" and result["error"]  # one value per channel: BatchNorm refuses


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--modes", "fast"], "unknown modes ['fast']"),
        (["bench", "--models", "resnet50"], "unknown model 'resnet50'"),
        (["bench", "--batch", "0"], "batch sizes must be positive"),
        (["bench", "--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["bench", "--device", "cpu", "--max-batch"], "--max-batch searches GPU memory"),
        (["bench", "--amp", "fp32,fp8"], "--amp: unknown ['fp8']; choose from ['fp32', 'bf16', 'fp16']"),
        (["bench", "--layouts", "nhwc"], "--layouts: unknown ['nhwc']; choose from ['contiguous', 'channels_last']"),
        (["bench", "--spatial-dims", "1", "--channels-last"], "sequences ([N, C, L]) have no channels-last format"),
        (["plan", "--model", "densenet_bc_250_24", "--batch", "64", "--memory", "lots"], "memory must look like 16GiB"),
        (["plan", "--model", "densenet_bc_250_24", "--batch", "-1", "--memory", "16GiB"], "expected a positive whole number, got -1"),
        (["plan", "--model", "vgg16", "--batch", "64", "--memory", "16GiB"], "unknown model 'vgg16'"),
        (["plan", "--model", "densenet121", "--batch", "8"], "the following arguments are required: --memory"),
        (["train", "--batch", "0"], "argument --batch: expected a positive whole number, got 0"),
        (["train", "--arch", "densenet_bc-7-8"], "argument --arch: DenseNet-BC depth must be 6n + 4 with n >= 1"),
        (["train", "--epochs", "two"], "argument --epochs: expected a whole number, got 'two'"),
        (["train", "--lr", "-0.1"], "argument --lr: expected a positive number, got -0.1"),
        (["train", "--drop-rate", "1"], "argument --drop-rate: expected a probability in [0, 1), got 1"),
        (["train", "--workers", "-2"], "argument --workers: expected a whole number >= 0, got -2"),
    ],
)
def test_bad_arguments_exit_with_code_2_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_parse_memory_units():
    assert parse_memory("16GiB") == 16 * 2**30
    assert parse_memory("80 GB") == 80 * 10**9
    assert parse_memory("1.5TiB") == int(1.5 * 2**40)
    assert parse_memory("512mib") == 512 * 2**20
    assert parse_memory("1000") == 1000


def test_plan_reports_every_mode_and_the_largest_batch(capsys):
    main(["plan", "--model", "densenet_bc_250_24", "--batch", "64", "--memory", "16GiB"])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in
             ("naive", "checkpoint", "efficient", "efficient+recompute")}
    assert set(lines) == {"naive", "checkpoint", "efficient", "efficient+recompute"}
    memory = 16 * 2**30
    for mode, cells in lines.items():
        predicted, fits, largest = float(cells[1]) * 2**30, cells[3], int(cells[4])
        assert fits == ("yes" if predicted <= memory else "no")
        with torch.device("meta"):
            model = models.densenet_bc_250_24(mode=mode.split("+")[0], recompute_bottleneck=mode.endswith("recompute"))
        assert estimate_training_step(model, (largest, 3, 32, 32)).total <= memory
        assert estimate_training_step(model, (largest + 1, 3, 32, 32)).total > memory
    assert int(lines["efficient"][4]) > 5 * int(lines["naive"][4])


def test_largest_batch_search():
    assert largest_batch(lambda b: b <= 37) == 37
    assert largest_batch(lambda b: b <= 1) == 1
    assert largest_batch(lambda b: False) == 0
