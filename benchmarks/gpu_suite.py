"""The project's GPU check: one command, within a budget, build included,
for a machine with a CUDA GPU, torch preinstalled and no network:

    python3 benchmarks/gpu_suite.py --budget 9 --out DIR --commit SHA

Stages, in priority order, each capped and each run in processes of its own
(killed at the stage's cap or the suite's deadline, whichever comes first):

  environment  GPU, driver, torch, CUDA, cuDNN, nvcc, compute-sanitizer, commit, date
  build        setup.py build_ext --inplace for the visible GPU's architecture only, on every core
  smoke        `info`; an efficient and a naive block against float64, fp32 and fp16
  tests        pytest -m cuda (per-test timeout, JUnit) beside compute-sanitizer memcheck,
               filtered to our kernels, over benchmarks/gpu_check_case.py
  kernels      each per-channel kernel's bandwidth as a fraction of a device-to-device copy
  models       densenet_bc_250_24 at batch 64: naive / efficient / efficient+recompute, fp32 and
               bf16 autocast, each in a fresh process: peak memory beside the plan's prediction,
               median step time
  extras       with the time left: racecheck (filtered), the torch.compile test alone, the train tests

The deadline is the start plus the budget less a margin for writing results.
A stage that has less time left than it needs is skipped ("no time"); when
the build fails, so is every stage after it (each needs the extension). Before
a stage starts it is recorded as running; after every step results.json and
results.md in DIR are rewritten atomically, and every process's output
streams into a log in DIR, so a kill at any moment leaves the finished stages'
results and the running one's log. DIR (default: $OUT, else build/gpu_suite)
receives at most seven files: results.json, results.md, stages.log, tests.log,
junit.xml, memcheck.log, racecheck.log.

--rehearse runs the same plumbing on the CPU (CI does, tests/test_gpu_suite.py):
no compilation (the extension built here is checked), tiny shapes, no
compute-sanitizer; --hang STAGE then makes that stage's processes hang, to
rehearse a stage killed at its deadline.

Exit status: 0 when every stage that ran passed; 1 when one failed or timed
out; 2 for bad arguments, or no CUDA GPU without --rehearse (one line on
stderr); 128 + N when killed by signal N."""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import gpu_report  # noqa: E402
from gpu_work import KERNEL_NAMESPACE, find_tool  # noqa: E402


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: float | None  # None: whatever is left before the deadline
    needs_s: float  # not started with less time left than this


# The caps of all but the last sum to the 9-minute budget less its margin
# plus a minute: the tests (the check's point) may use the minute a build
# usually leaves; a build that takes its whole cap leaves the models less
# (the deadline stops every stage). Extras take what the others leave.
# README.md ("GPU") gives the expected time of each.
STAGES = (
    Stage("environment", 20, 5),
    Stage("build", 240, 60),
    Stage("smoke", 30, 10),
    Stage("tests", 180, 30),
    Stage("kernels", 30, 10),
    Stage("models", 80, 15),
    Stage("extras", None, 20),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
MARGIN_S = 20  # at most this, and at most a tenth of the budget, is kept for writing results
# Steps of the extras stage: (cap, needs) in seconds.
EXTRA_STEPS = {"racecheck": (60, 20), "torch_compile": (150, 60), "train": (90, 30)}
PER_TEST_TIMEOUT_S = 60
PYTEST_NO_TESTS = 5  # pytest's exit status when it collected no test
COMPILE_TEST_TIMEOUT_S = 150
# The sanitizer instruments the kernels whose names contain our namespace and
# no other (verify-build checks that every kernel of ours has it).
KERNEL_FILTER = f"kns={KERNEL_NAMESPACE}"
SANITIZER_PRINT_LIMIT = 50
HANG = [sys.executable, "-c", "import time; time.sleep(3600)"]
KILL_WAIT_S = 5
FILES = ("results.json", "results.md", "stages.log", "tests.log", "junit.xml", "memcheck.log", "racecheck.log")
# The GPU run's model rows and the rehearsal's (which runs every line of the
# row code on a tiny model: one row without autocast, one with).
MODEL = {"model": "densenet_bc_250_24", "batch": 64, "max_steps": 30}
MODEL_ROW_NEEDS_S = 15  # a fresh process, the model, two warm-up steps and three timed ones
MODEL_ROWS = [(mode, precision) for precision in ("fp32", "bf16")
              for mode in ("naive", "efficient", "efficient+recompute")]
REHEARSAL_MODEL = {"model": "densenet_bc-10-4", "batch": 2, "max_steps": 3}
REHEARSAL_MODEL_ROWS = [("naive", "fp32"), ("efficient+recompute", "bf16")]
KERNEL_SHAPE, REHEARSAL_KERNEL_SHAPE = "64,1000,32,32", "2,8,8,8"


class SuiteKilled(BaseException):  # not an Exception: a stage's error handling must not swallow it
    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class ArgumentParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"gpu_suite: error: {message}\n")
        sys.exit(2)


def positive_minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"the budget is a positive number of minutes, got {text!r}")
    return value


def parse_arguments(argv) -> argparse.Namespace:
    parser = ArgumentParser(prog="gpu_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=positive_minutes, default=9.0, help="minutes, build included (default 9)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "build" / "gpu_suite"),
                        help="folder for results and logs (default: $OUT, else build/gpu_suite)")
    parser.add_argument("--commit", help="commit to record (default: git rev-parse HEAD, else 'unknown')")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES),
                        help=f"comma-separated, run in priority order: {','.join(STAGE_NAMES)} "
                             "(environment always runs)")
    parser.add_argument("--rehearse", action="store_true", help="the same plumbing on the CPU, tiny shapes (CI)")
    parser.add_argument("--hang", metavar="STAGE", help="with --rehearse: that stage's processes hang")
    args = parser.parse_args(argv)
    selected = [name for name in args.stages.split(",") if name]
    unknown = [name for name in selected if name not in STAGE_NAMES]
    if unknown or not selected:
        named = ", ".join(map(repr, unknown)) or "list (empty)"
        parser.error(f"unknown stage {named}; stages: {', '.join(STAGE_NAMES)}")
    args.stages = [name for name in STAGE_NAMES if name in selected or name == "environment"]
    if args.hang is not None and (not args.rehearse or args.hang not in STAGE_NAMES):
        parser.error(f"--hang takes a stage ({', '.join(STAGE_NAMES)}) and needs --rehearse; got {args.hang!r}")
    return args


def current_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def build_environment(capability: str, base: dict) -> dict:
    """The build's environment: this GPU's architecture alone (an inherited
    TORCH_CUDA_ARCH_LIST would build several, each costing as much again),
    every core, CUDA kernels required, and CUDA_HOME where torch may guess it
    wrong (a wrapper nvcc on PATH)."""
    env = dict(base)
    env["TORCH_CUDA_ARCH_LIST"] = capability
    env["MAX_JOBS"] = str(os.cpu_count() or 1)
    env["DENSENET_EFFICIENT_CUDA"] = "1"
    if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = "/usr/local/cuda"
    return env


def sanitizer_command(sanitizer: str, tool: str) -> list[str]:
    """compute-sanitizer checking our kernels alone; API errors are left to
    torch (which raises on them), so the count is of our kernels' accesses."""
    return [sanitizer, "--tool", tool, "--kernel-name", KERNEL_FILTER, "--report-api-errors", "no",
            "--print-limit", str(SANITIZER_PRINT_LIMIT), "--error-exitcode", "1"]


def combined_status(steps: dict) -> dict:
    """A stage's status from its steps': a timeout or a failure wins; all
    skipped is skipped."""
    outcomes = list(steps.values())
    for status in ("timeout", "failed"):
        first = next((o for o in outcomes if o["status"] == status), None)
        if first:
            return {key: first[key] for key in ("status", "rc", "why") if key in first}
    if outcomes and all(o["status"] == "skipped" for o in outcomes):
        return {"status": "skipped", "why": outcomes[0].get("why")}
    return {"status": "ok"}


@dataclass
class Running:
    name: str
    process: subprocess.Popen
    log: TextIO
    started: float


class Suite:
    def __init__(self, args: argparse.Namespace, command: list[str], started: float):
        self.args, self.started = args, started
        self.rehearsal = args.rehearse
        self.device = "cpu" if self.rehearsal else "cuda"
        budget_s = args.budget * 60
        self.deadline = started + budget_s - min(MARGIN_S, budget_s / 10)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        for name in FILES:  # a file left by an earlier run would pass for this one's
            (self.out / name).unlink(missing_ok=True)
            (self.out / (name + ".tmp")).unlink(missing_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))  # records and JUnit files not kept
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")  # logs must hold what a killed process printed
        # On the GPU the extension is built in place: the tree is the package,
        # and processes start there. A rehearsal checks the package this
        # interpreter imports (an editable install, or one CI installed for
        # another torch), which the tree must not shadow: its processes start
        # in the scratch folder (`python -m pytest` puts the folder it starts
        # in first on the path).
        if not self.rehearsal:
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.workdir = self.scratch if self.rehearsal else ROOT
        self.running: list[Running] = []
        self.record_files = itertools.count()
        self.report = {
            "suite": {"command": command, "commit": args.commit or current_commit(), "budget_minutes": args.budget,
                      "deadline_s": self.deadline - started, "rehearsal": self.rehearsal, "device": self.device,
                      "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "state": "running", "elapsed_s": 0.0},
            "stages": {stage.name: {"status": "pending", "cap_s": stage.cap_s} for stage in STAGES
                       if stage.name in args.stages},
        }

    # --- time and files -----------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.report["suite"]["elapsed_s"] = round(self.now(), 1)
        gpu_report.write_results(self.report, self.out)

    def say(self, text: str) -> None:
        print(f"[{self.now():5.0f} s] {text}", flush=True)

    # --- processes ----------------------------------------------------------

    def work(self, task: str, *options: str) -> tuple[list[str], Path]:
        """A gpu_work.py command and the file it appends its records to."""
        records = self.scratch / f"{task}-{next(self.record_files)}.jsonl"
        return [sys.executable, str(HERE / "gpu_work.py"), task, "--device", self.device, "--records", str(records),
                *options], records

    def start(self, stage: str, name: str, command: list[str], log_name: str, env: dict | None = None) -> Running:
        if stage == self.args.hang:
            command = HANG
        log = open(self.out / log_name, "a")
        log.write(f"\n===== [{self.now():.0f} s] {stage} / {name}: {shlex.join(command)}\n")
        log.flush()
        # Its own process group, so that a kill reaches what it started (ninja
        # and nvcc, the sanitizer's target); the same session, so that whoever
        # ends this command's session ends them too.
        process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env or self.env,
                                   process_group=0)
        running = Running(name, process, log, time.monotonic())
        self.running.append(running)
        return running

    def stop(self, running: Running) -> None:
        """Kills the step's process group: the step if it still runs, and
        whatever it left behind when it ended (compile workers, say)."""
        try:
            os.killpg(running.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone
        try:
            running.process.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass  # stuck in the driver: recorded as a timeout all the same

    def finish(self, running: Running, until: float) -> dict:
        """Waits for a step until `until`, then kills it; its outcome."""
        try:
            rc = running.process.wait(timeout=max(0.0, until - time.monotonic()))
            outcome = {"status": "ok" if rc == 0 else "failed", "rc": rc}
        except subprocess.TimeoutExpired:
            outcome = {"status": "timeout", "why": f"killed after {time.monotonic() - running.started:.0f} s"}
        finally:  # also when the suite itself is being killed
            self.stop(running)
            self.running.remove(running)
        outcome["seconds"] = round(time.monotonic() - running.started, 1)
        running.log.write(f"===== [{self.now():.0f} s] {running.name}: {gpu_report.status_text(outcome)}\n")
        running.log.close()
        return outcome

    def run_steps(self, stage: str, entry: dict, steps: list[tuple], until: float) -> None:
        """Runs steps (name, command, log name[, env]) side by side until
        `until`, recording each as running, then its outcome as it ends."""
        limit, started = round(until - time.monotonic()), []
        for name, command, log_name, *env in steps:
            entry.setdefault("steps", {})[name] = {"status": "running", "timeout_s": limit}
            started.append(self.start(stage, name, command, log_name, *env))
        self.save()
        for running in started:
            entry["steps"][running.name] = dict(self.finish(running, until), timeout_s=limit)
            self.save()

    def pytest_ran_nothing(self, entry: dict, name: str) -> None:
        """pytest's status 5, no test collected (every test deselected or
        its module skipped for a missing package), is no failure."""
        step = entry["steps"][name]
        if step.get("rc") == PYTEST_NO_TESTS:
            step.update(status="skipped", why="pytest collected no test to run")
            self.save()

    def skip_step(self, entry: dict, name: str, why: str) -> None:
        entry.setdefault("steps", {})[name] = {"status": "skipped", "why": why}
        self.save()

    @staticmethod
    def read_records(path: Path) -> list[dict]:
        """What a gpu_work.py process recorded (nothing, if it died first;
        not the half line it was writing when killed)."""
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
        return records

    # --- stages -------------------------------------------------------------

    def stage_environment(self, entry: dict, until: float) -> None:
        command, records = self.work("environment")
        self.run_steps("environment", entry, [("record", command, "stages.log")], until)
        found = self.read_records(records)
        entry["record"] = found[0] if found else None

    def capability(self) -> str | None:
        record = self.report["stages"]["environment"].get("record") or {}
        return record.get("capability") if record.get("capability") not in (None, "none") else None

    def stage_build(self, entry: dict, until: float) -> None:
        capability = self.capability()
        if capability is None:
            capability, entry["arch_note"] = "9.0", "no GPU capability recorded: 9.0 assumed (H100/H200)"
        env = build_environment(capability, self.env)
        entry.update(arch=env["TORCH_CUDA_ARCH_LIST"], max_jobs=env["MAX_JOBS"], cuda_home=env.get("CUDA_HOME"))
        compile_command = [sys.executable, str(ROOT / "setup.py"), "build_ext", "--inplace"]
        if self.rehearsal:
            entry["rehearsed"] = True
            self.skip_step(entry, "compile", f"rehearsal: `{shlex.join(compile_command)}` not run; "
                                             "the extension built here is checked")
        else:
            self.run_steps("build", entry, [("compile", compile_command, "stages.log", env)], until)
            if entry["steps"]["compile"]["status"] != "ok":
                self.skip_step(entry, "verify", "the build did not finish")
                return
        command, records = self.work("verify-build")
        self.run_steps("build", entry, [("verify", command, "stages.log")], until)
        found = self.read_records(records)
        entry["verify"] = found[0] if found else None

    def stage_smoke(self, entry: dict, until: float) -> None:
        command, records = self.work("smoke")
        self.run_steps("smoke", entry, [("smoke", command, "stages.log")], until)
        found = self.read_records(records)
        entry["info"] = next((r["lines"] for r in found if r.get("check") == "info"), None)
        entry["blocks"] = [r for r in found if r.get("check") == "block"]

    def check_case(self, tool: str, quick: bool) -> tuple[list[str] | None, dict, str]:
        """The sanitizer case's command (None when compute-sanitizer is
        missing), its environment, and what its result will mean."""
        case = [sys.executable, str(HERE / "gpu_check_case.py"), "--device", self.device, *(["--quick"] if quick else [])]
        if self.rehearsal:
            return case, self.env, "rehearsal: the case ran on the CPU, without compute-sanitizer"
        sanitizer = find_tool("compute-sanitizer")
        if sanitizer is None:
            return None, self.env, "compute-sanitizer not found"
        # Without the caching allocator every tensor is an allocation of its
        # own, so memcheck sees a read past a tensor's end.
        env = dict(self.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1") if tool == "memcheck" else self.env
        return sanitizer_command(sanitizer, tool) + case, env, ""

    def sanitizer_result(self, entry: dict, tool: str, note: str) -> str:
        step = entry["steps"].get(tool, {})
        if note:
            return f"{note}: {step.get('status')}"
        summary = gpu_report.sanitizer_summary((self.out / f"{tool}.log").read_text(errors="replace"))
        if summary is None:
            return f"no summary from compute-sanitizer ({gpu_report.status_text(step)})"
        errors, line = summary
        return f"{errors} errors in our kernels ({line}), rc {step.get('rc')}"

    def pytest_command(self, tests: list[str], junit: Path, per_test_timeout: int, *options: str) -> list[str]:
        return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfE", "--tb=short",
                f"--timeout={per_test_timeout}", f"--junitxml={junit}", *options, *tests]

    def tests_summary(self, junit: Path, log_name: str) -> dict:
        if junit.exists():
            return gpu_report.junit_summary(junit)
        return gpu_report.pytest_log_summary((self.out / log_name).read_text(errors="replace"))

    def stage_tests(self, entry: dict, until: float) -> None:
        junit = self.out / "junit.xml"
        # Without a GPU every CUDA test skips: one file rehearses the plumbing.
        tests = [str(ROOT / "tests" / "test_cuda.py")] if self.rehearsal else [str(ROOT / "tests")]
        cuda_tests = self.pytest_command(tests, junit, PER_TEST_TIMEOUT_S, "-m", "cuda", "-k", "not torch_compile")
        steps = [("pytest", cuda_tests, "tests.log")]
        memcheck, env, note = self.check_case("memcheck", quick=False)
        if memcheck is None:
            self.skip_step(entry, "memcheck", note)
        else:
            steps.append(("memcheck", memcheck, "memcheck.log", env))
        self.run_steps("tests", entry, steps, until)
        self.pytest_ran_nothing(entry, "pytest")
        entry["pytest"] = self.tests_summary(junit, "tests.log")
        entry["memcheck"] = self.sanitizer_result(entry, "memcheck", note) if memcheck else note

    def stage_kernels(self, entry: dict, until: float) -> None:
        shape, repeats = (REHEARSAL_KERNEL_SHAPE, "3") if self.rehearsal else (KERNEL_SHAPE, "20")
        command, records = self.work("kernels", "--shape", shape, "--repeats", repeats)
        self.run_steps("kernels", entry, [("kernels", command, "stages.log")], until)
        entry["rows"] = self.read_records(records)

    def stage_models(self, entry: dict, until: float) -> None:
        model, rows = (REHEARSAL_MODEL, REHEARSAL_MODEL_ROWS) if self.rehearsal else (MODEL, MODEL_ROWS)
        needs = 1 if self.rehearsal else MODEL_ROW_NEEDS_S
        entry["rows"] = []
        for index, (mode, precision) in enumerate(rows):
            name, left = f"{mode} {precision}", until - time.monotonic()
            row = {"model": model["model"], "batch": model["batch"], "mode": mode, "precision": precision}
            if left < needs:
                self.skip_step(entry, name, f"no time ({left:.0f} s left)")
                entry["rows"].append(dict(row, result="skipped: no time"))
                continue
            # An equal share of what is left; the row fills most of it with
            # timed steps, the rest is its start (import, model, warm-up).
            share = left / (len(rows) - index)
            command, records = self.work("model-row", "--model", model["model"], "--batch", str(model["batch"]),
                                         "--mode", mode, "--precision", precision, "--seconds", f"{0.7 * share:.1f}",
                                         "--max-steps", str(model["max_steps"]))
            self.run_steps("models", entry, [(name, command, "stages.log")], time.monotonic() + share)
            found = self.read_records(records)
            entry["rows"].append(found[0] if found else dict(row, result=gpu_report.status_text(entry["steps"][name])))
            self.save()

    def stage_extras(self, entry: dict, until: float) -> None:
        entry["tests"] = {}
        for name, (cap, needs) in EXTRA_STEPS.items():
            left = until - time.monotonic()
            needs = 1 if self.rehearsal else needs
            if left < needs:
                self.skip_step(entry, name, f"no time ({left:.0f} s left, needs {needs} s)")
                continue
            step_until = min(time.monotonic() + cap, until)
            if name == "racecheck":
                racecheck, env, note = self.check_case("racecheck", quick=True)
                if racecheck is None:
                    self.skip_step(entry, name, note)
                    continue
                self.run_steps("extras", entry, [(name, racecheck, "racecheck.log", env)], step_until)
                entry["racecheck"] = self.sanitizer_result(entry, "racecheck", note)
                continue
            junit = self.scratch / f"{name}.xml"
            if name == "torch_compile":
                command = self.pytest_command([str(ROOT / "tests" / "test_cuda.py")], junit, COMPILE_TEST_TIMEOUT_S,
                                              "-k", "torch_compile")
            else:  # the train tests pick the GPU themselves (--device auto); the rehearsal runs the quickest
                command = self.pytest_command([str(ROOT / "tests" / "test_train.py")], junit, PER_TEST_TIMEOUT_S,
                                              *(["-k", "augmentation"] if self.rehearsal else []))
            log_start = (self.out / "stages.log").stat().st_size
            self.run_steps("extras", entry, [(name, command, "stages.log")], step_until)
            self.pytest_ran_nothing(entry, name)
            if junit.exists():
                entry["tests"][name] = gpu_report.junit_summary(junit)
            else:
                with open(self.out / "stages.log", errors="replace") as log:
                    log.seek(log_start)
                    entry["tests"][name] = gpu_report.pytest_log_summary(log.read())
            self.save()

    # --- the run ------------------------------------------------------------

    def run_stage(self, stage: Stage) -> None:
        entry = self.report["stages"][stage.name]
        left, needs = self.left(), 1 if self.rehearsal else stage.needs_s
        if left < needs:
            entry.update(status="skipped", why=f"no time ({max(left, 0):.0f} s left, needs {needs:.0f} s)")
            self.say(f"{stage.name}: {gpu_report.status_text(entry)}")
            self.save()
            return
        cap = left if stage.cap_s is None else stage.cap_s
        until = min(time.monotonic() + cap, self.deadline)
        entry.update(status="running", started_s=round(self.now(), 1), cap_s=round(cap))
        self.say(f"{stage.name}: running (cap {cap:.0f} s, {left:.0f} s left)")
        self.save()
        begun = time.monotonic()
        try:
            getattr(self, f"stage_{stage.name}")(entry, until)
            entry.update(combined_status(entry.get("steps", {})))
        except Exception as error:  # a slip of this script costs its stage, not the stages after it
            for running in list(self.running):
                self.stop(running)
            self.running.clear()
            entry.update(status="failed", rc=None, why=f"gpu_suite: {error!r}")
            with open(self.out / "stages.log", "a") as log:
                log.write(f"===== {stage.name}: gpu_suite failed\n{traceback.format_exc()}")
        finally:
            entry["seconds"] = round(time.monotonic() - begun, 1)
        self.say(f"{stage.name}: {gpu_report.status_text(entry)} ({entry['seconds']:.0f} s)")
        self.save()

    def no_gpu(self) -> bool:
        record = self.report["stages"]["environment"].get("record")
        return not self.rehearsal and record is not None and not record.get("cuda_available")

    def skip_pending(self, why: str) -> None:
        for entry in self.report["stages"].values():
            if entry["status"] == "pending":
                entry.update(status="skipped", why=why)

    def run(self) -> int:
        self.save()
        for stage in STAGES:
            if stage.name not in self.args.stages:
                continue
            self.run_stage(stage)
            if stage.name == "environment" and self.no_gpu():
                return self.refuse("no CUDA GPU is visible (torch.cuda.is_available() is False); "
                                   "--rehearse runs the check's plumbing on the CPU")
            build = self.report["stages"].get("build", {})
            if stage.name == "build" and build["status"] in ("failed", "timeout"):  # each later stage needs it
                self.skip_pending(f"no extension (build: {gpu_report.status_text(build)})")
                break
        self.report["suite"]["state"] = "finished"
        self.save()
        print(gpu_report.markdown(self.report), flush=True)
        failed = [s for s in self.report["stages"].values() if s["status"] in ("failed", "timeout")]
        return 1 if failed else 0

    def refuse(self, why: str) -> int:
        self.skip_pending("no CUDA GPU")
        self.report["suite"]["state"] = "refused: no CUDA GPU"
        self.save()
        sys.stderr.write(f"gpu_suite: error: {why}\n")
        return 2

    def killed(self, signum: int) -> int:
        """Ends what runs, records the running stage as killed and the rest
        as not run."""
        for running in list(self.running):
            self.stop(running)
        for entry in self.report["stages"].values():
            if entry["status"] == "running":
                entry.update(status="killed", why=f"signal {signum}")
                for step in entry.get("steps", {}).values():
                    if step["status"] == "running":
                        step.update(status="killed", why=f"signal {signum}")
        self.skip_pending(f"suite killed (signal {signum})")
        self.report["suite"]["state"] = f"killed (signal {signum})"
        self.save()
        return 128 + signum


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_arguments(argv)
    try:
        suite = Suite(args, sys.argv if argv is None else ["gpu_suite.py", *argv], started)
    except OSError as error:
        sys.stderr.write(f"gpu_suite: error: cannot write results to {args.out}: {error.strerror or error}\n")
        return 2

    def on_signal(signum, frame):
        raise SuiteKilled(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        return suite.run()
    except SuiteKilled as killed:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # the record is written whole
        return suite.killed(killed.signum)
    finally:
        shutil.rmtree(suite.scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
