"""setuptools' build backend, building against the torch of the environment
being installed into.

The extension must be compiled against the very torch it will run with, so
torch is not a build requirement (pip would fetch some other torch into its
isolated build environment). Under pip's default build isolation the
environment's own site-packages are hidden, but the interpreter is the
environment's: its site-packages are found from sysconfig and put behind the
isolated ones, so ``pip install .`` works as ``pip install
--no-build-isolation .`` does. Without torch the build stops with one line.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import site
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the hooks; those below replace some)

NO_TORCH = (
    "densenet_efficient compiles against the torch it will run with, and this Python has none: "
    "pip install torch first (https://pytorch.org/get-started), then pip install ."
)


def _use_installed_torch() -> None:
    if importlib.util.find_spec("torch") is not None:
        return
    paths = sysconfig.get_paths()
    for path in (paths["purelib"], paths["platlib"]):
        site.addsitedir(path)  # appended, behind the isolated environment; .pth files read as site would
    importlib.invalidate_caches()
    if importlib.util.find_spec("torch") is None:
        raise SystemExit(NO_TORCH)
    # The environment's tools too (ninja: parallel compilation).
    os.environ["PATH"] = os.pathsep.join([paths["scripts"], os.environ.get("PATH", "")])


# The PEP 517 hooks, each finding torch first (setup.py imports it).
_HOOKS = (
    "get_requires_for_build_wheel", "get_requires_for_build_editable", "get_requires_for_build_sdist",
    "prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable",
    "build_wheel", "build_editable", "build_sdist",
)


def _finding_torch_first(name: str):
    hook = getattr(_setuptools, name)

    @functools.wraps(hook)
    def run(*args, **kwargs):
        _use_installed_torch()
        return hook(*args, **kwargs)

    return run


globals().update({name: _finding_torch_first(name) for name in _HOOKS})
