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

import importlib.util
import os
import site
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517 hooks)

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


def get_requires_for_build_wheel(config_settings=None):
    _use_installed_torch()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _use_installed_torch()
    return _setuptools.get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_installed_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_installed_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_installed_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_installed_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def get_requires_for_build_sdist(config_settings=None):
    _use_installed_torch()
    return _setuptools.get_requires_for_build_sdist(config_settings)


def build_sdist(sdist_directory, config_settings=None):
    _use_installed_torch()
    return _setuptools.build_sdist(sdist_directory, config_settings)
