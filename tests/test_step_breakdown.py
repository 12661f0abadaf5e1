"""benchmarks/step_breakdown.py on a small model: it runs, every share of
both steps is counted, and the per-channel operators it sizes are found."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_breakdown.py"


def test_breaks_down_both_steps_and_sizes_the_per_channel_operators():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "densenet_bc-16-6", "--input-size", "16", "--batch", "2",
         "--layout", "channels_last", "--steps", "1", "--profiled-steps", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in done.stdout.splitlines()
            if re.match(r"(naive|efficient) +\d", line)}
    # step ms, optimizer ms, the four profiled shares and their total: all measured, every share counted.
    assert set(rows) == {"naive", "efficient"} and all(len(r) == 7 and all(v > 0 for v in r) for r in rows.values())
    for row in rows.values():
        assert sum(row[2:6]) == pytest.approx(row[6], abs=0.25)
    assert re.search(r"floor [\d.]+ \+ [\d.]+ \+ [\d.]+ = [\d.]+ ms, ÷ naive [\d.]+", done.stdout), done.stdout
    for name in ("bn_relu_out", "bn_relu_backward_accumulate", "channel_stats_out"):
        assert re.search(rf"densenet_efficient::{name} +[\d.]+ ms +\d+ MB", done.stdout), done.stdout


def test_refuses_no_steps():
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--steps and --profiled-steps must be at least 1" in done.stderr
