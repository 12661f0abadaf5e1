"""What the GPU check (benchmarks/gpu_suite.py) writes and reads: results.json
and results.md (rewritten whole, atomically, after every step), the summary
of a pytest JUnit file or, where pytest was killed before writing one, of its
verbose log, and compute-sanitizer's error count."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")


def write_atomically(path: Path, text: str) -> None:
    """A reader (or a kill) sees the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_results(report: dict, out: Path) -> None:
    write_atomically(out / "results.json", json.dumps(report, indent=1) + "\n")
    write_atomically(out / "results.md", markdown(report))


# --- what the steps leave -------------------------------------------------------


def junit_summary(junit: Path) -> dict:
    """Counts of a pytest JUnit file, the ids of failed tests, and why tests
    were skipped (a GPU run whose tests all say "needs a CUDA GPU" ran nothing)."""
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    summary = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    summary["passed"] = summary["tests"] - summary["failures"] - summary["errors"] - summary["skipped"]
    summary["failed"], summary["skip_reasons"] = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            summary["failed"].append(name)
        skipped = case.find("skipped")
        if skipped is not None:
            reason = re.sub(r"^Skipped: ", "", skipped.get("message", ""))
            summary["skip_reasons"][reason] = summary["skip_reasons"].get(reason, 0) + 1
    return summary


def pytest_log_summary(log: str) -> dict:
    """What `pytest -v` had reported when it was killed: outcomes so far, and
    the test that was running (its id printed, its outcome not yet)."""
    counts = {outcome.lower(): 0 for outcome in OUTCOMES}
    failed, running = [], None
    for line in log.splitlines():
        match = re.match(r"^(\S+::\S+)(?:\s+(" + "|".join(OUTCOMES) + r")\b)?", line)
        if not match:
            continue
        running = None if match.group(2) else match.group(1)
        if match.group(2):
            counts[match.group(2).lower()] += 1
            if match.group(2) in ("FAILED", "ERROR"):
                failed.append(match.group(1))
    return {**counts, "failed_ids": failed, "running_when_stopped": running}


SANITIZER_SUMMARY = re.compile(
    r"ERROR SUMMARY: (\d+) errors?"  # memcheck (and initcheck, synccheck)
    r"|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, \d+ warnings?\)"  # racecheck
)


def sanitizer_summary(log: str) -> tuple[int, str] | None:
    """The error count of compute-sanitizer's last summary line, and the
    line; None when it printed none (it did not get that far)."""
    found = list(SANITIZER_SUMMARY.finditer(log))
    if not found:
        return None
    last = found[-1]
    return int(last.group(1) or last.group(2)), last.group(0)


# --- results.md -----------------------------------------------------------------


def status_text(entry: dict) -> str:
    status = entry.get("status", "?")
    if status == "failed":
        detail = f"rc {entry['rc']}" if entry.get("rc") is not None else entry.get("why")
        return f"failed ({detail})" if detail else status
    if status in ("skipped", "killed") and entry.get("why"):
        return f"{status}: {entry['why']}"
    return status


def _seconds(value) -> str:
    return "" if value is None else f"{value:.0f}"


def _mib(value) -> str:
    return "" if value is None else f"{value / 2**20:.0f}"


def _environment_lines(suite: dict, env: dict) -> list[str]:
    title = f"# GPU check — {env.get('gpu', 'unknown GPU')} — {env.get('date_utc', suite.get('started_utc'))}"
    lines = [title, ""]
    if suite.get("rehearsal"):
        lines += ["**Rehearsal on CPU**: the GPU stages' plumbing, run on the CPU with tiny shapes; "
                  "no number below describes a GPU.", ""]
    gpu = env.get("gpu", "?")
    if env.get("capability") not in (None, "none"):
        gpu += f" (capability {env['capability']}, {env.get('gpu_memory_gib')} GiB, driver {env.get('driver', '?')})"
    lines += [
        f"commit `{suite.get('commit')}`; GPU {gpu}; torch {env.get('torch', '?')} "
        f"(CUDA {env.get('torch_cuda', '?')}, cuDNN {env.get('cudnn', '?')}); nvcc {env.get('nvcc', '?')}; "
        f"compute-sanitizer {env.get('compute_sanitizer', '?')}; Python {env.get('python', '?')}; "
        f"{env.get('cpu_count', '?')} CPUs",
        "",
        f"budget {suite.get('budget_minutes')} min (stages end by {suite.get('deadline_s', 0):.0f} s); "
        f"state: {suite.get('state')}" + (f" after {suite['elapsed_s']:.0f} s" if suite.get("elapsed_s") else ""),
        "",
    ]
    return lines


def _stage_table(stages: dict) -> list[str]:
    lines = ["| stage | status | seconds | cap s |", "|---|---|---|---|"]
    for name, entry in stages.items():
        lines.append(f"| {name} | {status_text(entry)} | {_seconds(entry.get('seconds'))} | "
                     f"{_seconds(entry.get('cap_s'))} |")
    return lines + [""]


def _steps_lines(entry: dict) -> list[str]:
    return [f"- {name}: {status_text(step)}" + (f", {step['seconds']:.0f} s" if step.get("seconds") else "")
            for name, step in entry.get("steps", {}).items()]


def _tests_text(summary: dict | None) -> str:
    if not summary:
        return "no summary"
    if "tests" in summary:
        text = (f"{summary['tests']} tests: {summary['passed']} passed, {summary['failures']} failed, "
                f"{summary['errors']} errors, {summary['skipped']} skipped")
        if summary["failed"]:
            text += "; failed: " + ", ".join(f"`{name}`" for name in summary["failed"])
        if summary["skip_reasons"]:
            text += "; skipped because: " + ", ".join(f"{why} ({n})" for why, n in summary["skip_reasons"].items())
        return text
    text = (f"no JUnit file (pytest stopped); its log shows {summary['passed']} passed, {summary['failed']} failed, "
            f"{summary['error']} errors, {summary['skipped']} skipped")
    if summary["running_when_stopped"]:
        text += f"; running when stopped: `{summary['running_when_stopped']}`"
    return text


def _build_lines(entry: dict) -> list[str]:
    verify = entry.get("verify") or {}
    note = [entry["arch_note"], ""] if entry.get("arch_note") else []
    return note + [f"TORCH_CUDA_ARCH_LIST={entry.get('arch')}, MAX_JOBS={entry.get('max_jobs')}"
            + (" (rehearsal: not compiled; the extension already built here was checked)" if entry.get("rehearsed")
               else "")
            + f"; machine code in the extension: {verify.get('machine_code', '?')}; "
            f"CUDA kernels registered: {verify.get('cuda_kernels_registered', '?')}; "
            f"kernels in it: {verify.get('kernels', '?')}, the sanitizer's filter misses "
            f"{verify.get('kernels_the_sanitizer_filter_misses') or 'none'}", ""]


def _smoke_lines(entry: dict) -> list[str]:
    lines = []
    if entry.get("info"):
        lines += ["```", *entry["info"], "```", ""]
    blocks = entry.get("blocks", [])
    if blocks:
        lines += ["Efficient and naive block (4 layers, k=8, 8×16×12×12) against the float64 naive block, "
                  "relative error (efficient / naive):", "",
                  "| dtype | output | input grad | conv1 weight grad | within 2× naive |", "|---|---|---|---|---|"]
        for row in blocks:
            quantities = [row[q] for q in ("output", "input_grad", "conv_weight_grad")]
            lines.append(f"| {row['dtype']} | " + " | ".join(f"{q['efficient']:.1e} / {q['naive']:.1e}"
                                                            for q in quantities)
                         + f" | {'yes' if all(q['ok'] for q in quantities) else 'NO'} |")
        lines.append("")
    return lines


def _kernel_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["Bandwidth of the bytes each kernel must move, against a device-to-device copy of the same tensor "
             f"(median of {rows[0].get('repeats')} runs):", "",
             "| shape | layout | dtype | kernel | ms | GB/s | % of copy | ATen op | ATen ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = (f"{r['ms']:.3f} | {r['GB/s']:.0f} | {100 * r['fraction_of_copy']:.0f}%" if "ms" in r
                else f"error: {r.get('error')} | | ")
        aten = (f"{r['aten_ms']:.3f}" if "aten_ms" in r else f"error: {r['aten_error']}" if "aten_error" in r else "")
        lines.append(f"| {r['shape']} | {r.get('layout', 'contiguous')} | {r['dtype']} | {r['kernel']} | {ours} "
                     f"| {r.get('aten', '')} | {aten} |")
    return lines + [""]


def _model_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["| model | batch | mode | precision | peak MiB | plan MiB | peak / plan | step ms (median) | steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("result") != "ok":
            lines.append(f"| {r.get('model')} | {r.get('batch')} | {r.get('mode')} | {r.get('precision')} | "
                         f"{r.get('result', r.get('status', '?'))} | {_mib(r.get('predicted_bytes'))} | | | |")
            continue
        ratio = f"{r['peak_vs_predicted']:.3f}" if "peak_vs_predicted" in r else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['precision']} | "
                     f"{_mib(r.get('peak_bytes')) or 'n/a (CPU)'} | {_mib(r['predicted_bytes'])} | {ratio} | "
                     f"{r['step_ms']:.1f} | {r['steps']} |")
    return lines + [""]


def markdown(report: dict) -> str:
    suite, stages = report["suite"], report["stages"]
    env = stages.get("environment", {}).get("record") or {}
    lines = _environment_lines(suite, env) + _stage_table(stages)
    for name, entry in stages.items():
        if name == "environment" or entry.get("status") in ("pending",):
            continue
        lines += [f"## {name}: {status_text(entry)}", ""]
        lines += _steps_lines(entry)
        if entry.get("steps"):
            lines.append("")
        if name == "build":
            lines += _build_lines(entry)
        elif name == "smoke":
            lines += _smoke_lines(entry)
        elif name == "tests":
            lines += [f"pytest -m cuda: {_tests_text(entry.get('pytest'))}", "",
                      f"memcheck: {entry.get('memcheck', 'not run')}", ""]
        elif name == "kernels":
            lines += _kernel_lines(entry.get("rows", []))
        elif name == "models":
            lines += _model_lines(entry.get("rows", []))
        elif name == "extras":
            for step, summary in entry.get("tests", {}).items():
                lines += [f"{step}: {_tests_text(summary)}", ""]
            if "racecheck" in entry:
                lines += [f"racecheck: {entry['racecheck']}", ""]
    return "\n".join(lines)
