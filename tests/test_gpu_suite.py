"""The GPU script's bookkeeping, which runs without a GPU: the JUnit summary
it takes from pytest, and the JSON and Markdown it writes after each stage."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from densenet_efficient.bench import run_in_subprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_junit_summary_counts_cuda_cases(gpu_suite, tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert False\n"
        "@pytest.mark.skip(reason='no GPU')\n"
        "def test_on_cuda_skipped(): pass\n"
        "def test_on_cuda_fails(): assert False\n"
        "def test_on_cuda_passes(): pass\n"
    )
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                    str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True)
    summary = gpu_suite.junit_summary(junit)
    assert {k: summary[k] for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": 5, "failures": 2, "errors": 0, "skipped": 1}
    assert summary["cuda_cases"] == 3 and summary["cuda_skipped"] == 1
    assert [name.split("::")[1] for name in summary["cuda_failed"]] == ["test_on_cuda_fails"]


def test_write_renders_every_stage(gpu_suite, tmp_path):
    config = {"model": "densenet_bc-10-4", "mode": "efficient", "batch": 2, "input_size": 8, "device": "cpu",
              "steps": 1, "warmup": 1}
    bench_row = dict(config, **run_in_subprocess(config, timeout=300))
    assert bench_row["result"] == "ok", bench_row
    kernel = {"shape": [64, 1000, 32, 32], "dtype": "float32", "kernel": "bn_relu_out (forward)", "ms": 0.5,
              "GB/s": 2000.0, "fraction_of_copy": 0.8, "aten": "batch_norm(training)+relu_", "aten_ms": 0.9}
    report = {
        "environment": {"device": "Some GPU", "date_utc": "2026-11-23T00:00:00+00:00", "commit": "abc",
                        "torch": "2.11.0", "cuda": "13.0", "cudnn": 91000, "python": "3.12.3"},
        "quick": False,
        "stages": {
            "build": {"rc": 0, "arch": "9.0"},
            "tests": {"rc": 1, "tests": 5, "failures": 1, "errors": 0, "skipped": 0, "cuda_cases": 2,
                      "cuda_skipped": 0, "cuda_failed": ["tests.test_cuda::test_x"]},
            "sanitizer": {"memcheck": {"rc": 0, "clean": True}, "racecheck": {"rc": 1, "clean": False}},
            "kernels": [kernel, {k: v for k, v in kernel.items() if not k.startswith("aten")}],
            "models": {"rc": 0, "command": "-m densenet_efficient bench", "rows": [bench_row],
                       "max_batch": {"densenet_bc_190_40": {"naive": 64, "efficient": 512}}},
        },
        "seconds": {"build": 100.0, "tests": 200.0},
    }
    out = tmp_path / "out"
    gpu_suite.write(report, "stem", str(out), results=tmp_path / "results")
    assert json.loads((out / "stem.json").read_text()) == report
    text = (out / "stem.md").read_text()
    for expected in ("Some GPU", "commit `abc`", "build 100", "**build**: rc 0 (arch 9.0)", "1 failures",
                     "tests.test_cuda::test_x", "memcheck clean", "racecheck NOT clean (rc 1)",
                     "| bn_relu_out (forward) | 0.500 | 2000 | 80% | batch_norm(training)+relu_ | 0.900 |",
                     "| densenet_bc-10-4 | 3×8² | 2 | efficient |", "largest batch that runs, densenet_bc_190_40: naive 64, efficient 512"):
        assert expected in text, expected
