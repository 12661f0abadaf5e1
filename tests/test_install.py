"""`pip install .` with pip's default build isolation, through the real pip:
the in-tree build backend (build_backend/densenet_build.py) finds the
environment's own torch, and without any torch it stops with one line
saying what to do, no traceback. pip's --dry-run runs the backend's hooks up
to the package's metadata (setup.py and all) without compiling; the whole
build is measured by hand (see the README)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pip_dry_run(python: str):
    return subprocess.run([python, "-m", "pip", "install", "--dry-run", "--no-deps", str(ROOT)],
                          cwd=ROOT.parent, capture_output=True, text=True, timeout=600)


def test_pip_install_with_build_isolation_finds_the_installed_torch():
    result = _pip_dry_run(sys.executable)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Would install densenet-efficient" in result.stdout


def test_pip_install_without_torch_stops_with_one_line(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "bare")], check=True, timeout=600)
    result = _pip_dry_run(str(tmp_path / "bare" / "bin" / "python"))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "[1 lines of output]" in output and "pip install torch first" in output, output
    assert "Traceback" not in output
