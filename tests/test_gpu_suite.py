"""The GPU check (benchmarks/gpu_suite.py) rehearsed on the CPU, so that its
first run on a GPU cannot die on a slip in its plumbing: every stage's
processes, the files it writes, the deadline, what a killed run leaves,
argument errors; and the summaries it reads from pytest and compute-sanitizer."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SUITE = BENCHMARKS / "gpu_suite.py"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_suite():
    return load("gpu_suite")


def suite_command(*args):
    return [sys.executable, str(SUITE), *args]


def suite_env():
    env = dict(os.environ)
    env.pop("OUT", None)  # the default output folder must not be taken from the caller
    return env


def run_suite(*args, timeout=300):
    return subprocess.run(suite_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=suite_env())


def results(out):
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    done = run_suite("--rehearse", "--budget", "5", "--out", str(out), "--commit", "abc1234")
    return done, out


def test_a_rehearsal_runs_every_stage_into_few_shallow_files(rehearsal, gpu_suite):
    done, out = rehearsal
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    # What comes back from the GPU machine: at most 8 files, at most DIR/a/b/file.
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    report = results(out)
    assert report["suite"]["state"] == "finished" and report["suite"]["commit"] == "abc1234"
    assert list(report["stages"]) == list(gpu_suite.STAGE_NAMES)
    assert {name: s["status"] for name, s in report["stages"].items()} == dict.fromkeys(gpu_suite.STAGE_NAMES, "ok")
    stages = report["stages"]
    assert stages["environment"]["record"]["gpu"] == "none" and stages["environment"]["record"]["torch"]
    verify = stages["build"]["verify"]
    assert stages["build"]["rehearsed"] and verify["extension"].startswith("_C")
    assert verify["kernels_the_sanitizer_filter_misses"] == []
    assert [row["dtype"] for row in stages["smoke"]["blocks"]] == ["float32", "float16"]
    pytest_summary = stages["tests"]["pytest"]
    assert pytest_summary["tests"] > 100 and pytest_summary["skipped"] == pytest_summary["tests"]
    assert "needs a CUDA GPU" in pytest_summary["skip_reasons"]
    assert stages["tests"]["steps"]["memcheck"]["status"] == "ok"
    assert len(stages["kernels"]["rows"]) == 30 and all("ms" in row for row in stages["kernels"]["rows"])
    assert [(r["mode"], r["precision"], r["result"]) for r in stages["models"]["rows"]] == [
        ("naive", "fp32", "ok"), ("efficient+recompute", "bf16", "ok")]
    assert set(stages["extras"]["steps"]) == {"racecheck", "torch_compile", "train"}
    if importlib.util.find_spec("sklearn"):  # the train tests' digits
        assert stages["extras"]["tests"]["train"]["passed"] == 1
    else:  # they skip their module: pytest's "no test collected" is no failure
        assert stages["extras"]["steps"]["train"]["why"] == "pytest collected no test to run"

    text = (out / "results.md").read_text()
    assert "Rehearsal on CPU" in text and "commit `abc1234`" in text
    for name in gpu_suite.STAGE_NAMES:
        assert f"| {name} | ok |" in text, name
        if name != "environment":
            assert f"## {name}: ok" in text, name
    log = (out / "stages.log").read_text()
    for header in ("environment / record", "build / verify", "smoke / smoke", "kernels / kernels",
                   "models / naive fp32", "extras / torch_compile", "extras / train"):
        assert f"] {header}: " in log, header


def test_a_hung_stage_is_killed_at_the_deadline_and_later_stages_are_skipped(tmp_path):
    budget_s = 6  # 0.1 minutes: the deadline comes 5.4 s after the start
    started = time.monotonic()
    done = run_suite("--rehearse", "--hang", "environment", "--stages", "environment,build,smoke",
                     "--budget", str(budget_s / 60), "--out", str(tmp_path), timeout=60)
    assert time.monotonic() - started < budget_s
    assert done.returncode == 1, done.stderr
    stages = results(tmp_path)["stages"]
    assert stages["environment"]["status"] == "timeout"
    assert stages["environment"]["steps"]["record"]["status"] == "timeout"
    for name in ("build", "smoke"):
        assert stages[name]["status"] == "skipped" and stages[name]["why"].startswith("no time"), stages[name]
    assert "| build | skipped: no time" in (tmp_path / "results.md").read_text()


def _session_processes(session):
    """Process ids whose session is `session` (Linux: /proc/PID/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_run_keeps_finished_stages_and_shows_the_running_one(tmp_path, signum):
    (tmp_path / "tmp").mkdir()  # where a killed suite leaves its scratch folder
    process = subprocess.Popen(suite_command("--rehearse", "--hang", "smoke", "--stages", "smoke,kernels",
                                             "--budget", "2", "--out", str(tmp_path)),
                               cwd=ROOT, env=dict(suite_env(), TMPDIR=str(tmp_path / "tmp")),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its session holds every process it starts
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:  # the stage's process started
                if results(tmp_path)["stages"]["smoke"].get("steps", {}).get("smoke", {}).get("status") == "running":
                    break
            except (OSError, ValueError):
                pass  # not written yet
            time.sleep(0.2)
        else:
            pytest.fail("the smoke stage never started")
        os.kill(process.pid, signum)
        assert process.wait(timeout=30) in (-signum, 128 + signum)
        report = results(tmp_path)
        environment = report["stages"]["environment"]
        assert environment["status"] == "ok" and environment["record"]["gpu"] == "none"
        smoke = report["stages"]["smoke"]
        if signum == signal.SIGKILL:  # nothing could be written after the kill
            assert smoke["status"] == "running" and smoke["steps"]["smoke"]["status"] == "running"
            assert report["stages"]["kernels"]["status"] == "pending"
        else:  # the suite ended its processes and said so
            assert smoke["status"] == "killed" and smoke["why"] == "signal 15"
            assert report["stages"]["kernels"]["status"] == "skipped"
            assert report["suite"]["state"] == "killed (signal 15)"
            assert _session_processes(process.pid) == []
        assert "] smoke / smoke: " in (tmp_path / "stages.log").read_text()
    finally:
        for pid in _session_processes(process.pid):  # what the suite started and a SIGKILL left behind
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("args, message", [
    (["--stages", "build,bogus"], "unknown stage 'bogus'"),
    (["--stages", ""], "unknown stage"),
    (["--budget", "0"], "positive number of minutes, got '0'"),
    (["--budget", "-1"], "positive number of minutes, got '-1'"),
    (["--budget", "x"], "positive number of minutes, got 'x'"),
    (["--budget", "nan"], "positive number of minutes"),
    (["--hang", "smoke"], "needs --rehearse"),
    (["--rehearse", "--hang", "bogus"], "--hang takes a stage"),
])
def test_bad_arguments_give_one_line_and_status_2(tmp_path, args, message):
    done = run_suite(*args, "--out", str(tmp_path / "out"), timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("gpu_suite: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_made_gives_one_line_and_status_2(tmp_path):
    (tmp_path / "file").write_text("")
    done = run_suite("--rehearse", "--out", str(tmp_path / "file" / "out"), timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("gpu_suite: error: cannot write results to ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_and_without_rehearse_the_check_refuses(tmp_path):
    done = run_suite("--stages", "environment,build", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no CUDA GPU is visible" in done.stderr
    report = results(tmp_path)
    assert report["suite"]["state"] == "refused: no CUDA GPU"
    assert report["stages"]["build"] == {"status": "skipped", "cap_s": 240, "why": "no CUDA GPU"}


# --- the pieces that only the GPU run reaches ---------------------------------


def test_the_build_is_for_this_gpu_alone_on_every_core(gpu_suite):
    env = gpu_suite.build_environment("9.0", {"TORCH_CUDA_ARCH_LIST": "7.0;8.0;9.0", "PATH": "/bin"})
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert env["MAX_JOBS"] == str(os.cpu_count()) and env["DENSENET_EFFICIENT_CUDA"] == "1"
    assert env["PATH"] == "/bin"


@pytest.fixture
def make_suite(gpu_suite, tmp_path):
    """A Suite in this process, for its pieces (its scratch folder removed after)."""
    made = []

    def make(*args):
        suite = gpu_suite.Suite(gpu_suite.parse_arguments([*args, "--out", str(tmp_path)]), ["gpu_suite.py"],
                                time.monotonic())
        made.append(suite)
        return suite

    yield make
    for suite in made:
        shutil.rmtree(suite.scratch)


def test_a_failed_build_skips_the_stages_that_need_it(make_suite, tmp_path, monkeypatch):
    suite = make_suite("--rehearse", "--stages", "build,smoke,tests")
    monkeypatch.setattr(suite, "stage_environment", lambda entry, until: entry.update(record={"gpu": "none"}))
    monkeypatch.setattr(suite, "stage_build",
                        lambda entry, until: entry.update(steps={"compile": {"status": "failed", "rc": 1}}))
    assert suite.run() == 1
    stages = results(tmp_path)["stages"]
    assert stages["build"]["status"] == "failed" and stages["build"]["rc"] == 1
    for name in ("smoke", "tests"):
        assert stages[name]["status"] == "skipped"
        assert stages[name]["why"] == "no extension (build: failed (rc 1))"


def test_a_slip_in_a_stage_costs_that_stage_alone(make_suite, tmp_path, monkeypatch):
    suite = make_suite("--rehearse", "--stages", "smoke,kernels")
    monkeypatch.setattr(suite, "stage_environment", lambda entry, until: entry.update(record={"gpu": "none"}))

    def slip(entry, until):
        raise KeyError("rows")

    monkeypatch.setattr(suite, "stage_smoke", slip)
    monkeypatch.setattr(suite, "stage_kernels", lambda entry, until: entry.update(steps={"kernels": {"status": "ok"}}))
    assert suite.run() == 1
    stages = results(tmp_path)["stages"]
    assert stages["smoke"]["status"] == "failed" and stages["smoke"]["why"] == "gpu_suite: KeyError('rows')"
    assert "| smoke | failed (gpu_suite: KeyError('rows')) |" in (tmp_path / "results.md").read_text()
    assert stages["kernels"]["status"] == "ok"
    assert "KeyError: 'rows'" in (tmp_path / "stages.log").read_text()


def test_records_of_a_killed_process_are_read_up_to_its_half_line(gpu_suite, tmp_path):
    (tmp_path / "records.jsonl").write_text('{"row": 1}\n{"row": ')
    assert gpu_suite.Suite.read_records(tmp_path / "records.jsonl") == [{"row": 1}]
    assert gpu_suite.Suite.read_records(tmp_path / "never-written.jsonl") == []


def test_sanitizer_commands_check_our_kernels_alone(gpu_suite, make_suite, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "find_tool", lambda name: f"/opt/cuda/bin/{name}")
    suite = make_suite()
    command, env, note = suite.check_case("memcheck", quick=False)
    assert command[:2] == ["/opt/cuda/bin/compute-sanitizer", "--tool"] and command[2] == "memcheck"
    assert command[command.index("--kernel-name") + 1] == "kns=densenet_efficient"
    assert command[command.index("--error-exitcode") + 1] == "1"
    assert command[-3:] == [str(BENCHMARKS / "gpu_check_case.py"), "--device", "cuda"]
    assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1" and note == ""
    command, env, _ = suite.check_case("racecheck", quick=True)
    assert command[2] == "racecheck" and command[-1] == "--quick" and "PYTORCH_NO_CUDA_MEMORY_CACHING" not in env
    (tmp_path / "memcheck.log").write_text("========= Invalid __global__ read\n========= ERROR SUMMARY: 3 errors\n")
    entry = {"steps": {"memcheck": {"status": "failed", "rc": 1}}}
    assert suite.sanitizer_result(entry, "memcheck", "") == "3 errors in our kernels (ERROR SUMMARY: 3 errors), rc 1"
    (tmp_path / "memcheck.log").write_text("Traceback (most recent call last):\n")
    assert suite.sanitizer_result(entry, "memcheck", "") == "no summary from compute-sanitizer (failed (rc 1))"


def test_the_check_case_catches_a_write_outside_its_view():
    case_module = load("gpu_check_case")
    case = case_module.Case(torch.device("cpu"))
    flat, view = case.guarded("misaligned", (3,), torch.float32)
    view.fill_(1.0)
    case.check_untouched(flat, "misaligned", (3,), "fill")
    flat[0] = 2.0
    with pytest.raises(AssertionError, match="wrote outside its view"):
        case.check_untouched(flat, "misaligned", (3,), "fill")


# --- what the check reads and writes -------------------------------------------


SAMPLE_TESTS = (
    "import pytest\n"
    "def test_passes(): pass\n"
    "def test_fails(): assert False\n"
    "@pytest.mark.skip(reason='needs a CUDA GPU')\n"
    "def test_skipped(): pass\n"
    "def test_passes_too(): pass\n"
)


def test_pytest_summaries_from_junit_and_from_a_log_cut_short(tmp_path):
    gpu_report = load("gpu_report")
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    junit = tmp_path / "junit.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           "test_sample.py"], cwd=tmp_path, capture_output=True, text=True)
    summary = gpu_report.junit_summary(junit)
    assert {k: summary[k] for k in ("tests", "passed", "failures", "errors", "skipped")} == {
        "tests": 4, "passed": 2, "failures": 1, "errors": 0, "skipped": 1}
    assert summary["failed"] == ["test_sample::test_fails"] and summary["skip_reasons"] == {"needs a CUDA GPU": 1}

    log = done.stdout
    assert gpu_report.pytest_log_summary(log) == {
        "passed": 2, "failed": 1, "error": 0, "skipped": 1, "xfail": 0, "xpass": 0,
        "failed_ids": ["test_sample.py::test_fails"], "running_when_stopped": None}
    # Killed while the last test ran: its id is printed, its outcome is not.
    cut = log[: log.index("test_sample.py::test_passes_too") + len("test_sample.py::test_passes_too ")]
    summary = gpu_report.pytest_log_summary(cut)
    assert summary["passed"] == 1 and summary["running_when_stopped"] == "test_sample.py::test_passes_too"


def test_sanitizer_summaries_of_memcheck_and_racecheck():
    gpu_report = load("gpu_report")
    summary = gpu_report.sanitizer_summary
    assert summary("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n") == (0, "ERROR SUMMARY: 0 errors")
    assert summary("========= ERROR SUMMARY: 1 error\n") == (1, "ERROR SUMMARY: 1 error")
    racecheck = "========= RACECHECK SUMMARY: 4 hazards displayed (2 errors, 2 warnings)\n"
    assert summary(racecheck) == (2, "RACECHECK SUMMARY: 4 hazards displayed (2 errors, 2 warnings)")
    assert summary("========= COMPUTE-SANITIZER\nTraceback ...\n") is None


def test_markdown_renders_what_only_a_gpu_run_produces(tmp_path):
    """Rows the rehearsal cannot make: measured peaks, OOM, kernel errors,
    sanitizer counts, a pytest killed before its JUnit file."""
    gpu_report = load("gpu_report")
    kernel = {"shape": [64, 1000, 32, 32], "dtype": "float32", "kernel": "bn_relu_out (forward)", "repeats": 20,
              "ms": 0.5, "GB/s": 2000.0, "fraction_of_copy": 0.8, "aten": "batch_norm(training)+relu_", "aten_ms": 0.9}
    row = {"model": "densenet_bc_250_24", "batch": 64, "mode": "efficient", "precision": "bf16", "result": "ok",
           "predicted_bytes": 2 * 2**30, "peak_bytes": 2.1 * 2**30, "peak_vs_predicted": 1.05, "step_ms": 123.4,
           "steps": 12}
    report = {
        "suite": {"commit": "abc", "budget_minutes": 9, "deadline_s": 520, "state": "finished", "elapsed_s": 500},
        "stages": {
            "environment": {"status": "ok", "seconds": 4, "cap_s": 20, "record": {
                "gpu": "NVIDIA H200", "capability": "9.0", "gpu_memory_gib": 139.8, "driver": "580.159.04",
                "torch": "2.11.0+cu130", "torch_cuda": "13.0", "cudnn": 91200, "nvcc": "release 13.0, V13.0.88",
                "compute_sanitizer": "2025.3.0", "python": "3.12.3", "cpu_count": 16, "date_utc": "2026-12-02"}},
            "build": {"status": "ok", "seconds": 120, "cap_s": 240, "arch": "9.0", "max_jobs": "16",
                      "verify": {"machine_code": ["sm_90"], "cuda_kernels_registered": True}},
            "tests": {"status": "timeout", "seconds": 120, "cap_s": 120,
                      "steps": {"pytest": {"status": "timeout", "why": "killed after 120 s", "seconds": 120}},
                      "pytest": {"passed": 40, "failed": 1, "error": 0, "skipped": 0, "xfail": 0, "xpass": 0,
                                 "failed_ids": ["tests/test_cuda.py::test_x"],
                                 "running_when_stopped": "tests/test_cuda.py::test_y"},
                      "memcheck": "0 errors in our kernels (ERROR SUMMARY: 0 errors), rc 0"},
            "kernels": {"status": "failed", "rc": 1, "seconds": 10, "cap_s": 30, "rows": [
                kernel, {k: v for k, v in kernel.items() if k not in ("ms", "GB/s", "fraction_of_copy")}
                | {"error": "CUDA error: an illegal memory access"}]},
            "models": {"status": "ok", "seconds": 70, "cap_s": 80, "rows": [
                row, dict(row, mode="naive", result="OOM"), dict(row, mode="naive", precision="fp32",
                                                                 result="skipped: no time")]},
            "extras": {"status": "skipped", "why": "no time (3 s left, needs 20 s)", "cap_s": None},
        },
    }
    text = gpu_report.markdown(report)
    for expected in (
        "# GPU check — NVIDIA H200 — 2026-12-02", "driver 580.159.04", "compute-sanitizer 2025.3.0",
        "| tests | timeout | 120 | 120 |", "| kernels | failed (rc 1) |", "| extras | skipped: no time (3 s left",
        "running when stopped: `tests/test_cuda.py::test_y`", "0 errors in our kernels",
        "| bn_relu_out (forward) | 0.500 | 2000 | 80% | batch_norm(training)+relu_ | 0.900 |",
        "error: CUDA error: an illegal memory access",
        "| densenet_bc_250_24 | 64 | efficient | bf16 | 2150 | 2048 | 1.050 | 123.4 | 12 |",
        "| densenet_bc_250_24 | 64 | naive | bf16 | OOM |", "skipped: no time",
    ):
        assert expected in text, expected
    gpu_report.write_results(report, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
