"""What the compiled extension (densenet_efficient._C) was built against,
as setup.py recorded it next to the extension: the torch version, whether
CUDA kernels were compiled and for which GPU architectures. Used to explain
an extension that does not load, or lacks a device's kernels."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["REBUILD", "built_with", "cuda_kernels_registered", "extension_load_error", "require_kernels_for"]

REBUILD = "pip install --no-build-isolation --no-deps -e .  (from the source folder; see the README)"
_FILE = Path(__file__).resolve().parent / "_build_info.json"
_LIBRARY = "densenet_efficient"


def built_with() -> dict | None:
    """The build record, or None when there is none (a build by other means)."""
    try:
        return json.loads(_FILE.read_text())
    except (OSError, ValueError):
        return None


def extension_load_error(error: BaseException) -> str:
    """Why importing the extension failed, and the fix."""
    record = built_with()
    if record and record.get("torch") != torch.__version__:
        return (
            f"densenet_efficient's compiled extension was built against torch {record['torch']}, but torch "
            f"{torch.__version__} is installed: rebuild it against this torch with {REBUILD} ({error})"
        )
    return f"densenet_efficient's compiled extension could not be loaded ({error}); rebuild it with {REBUILD}"


def cuda_kernels_registered() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_LIBRARY}::bn_relu", "CUDA")


_checked: set[str] = set()


def require_kernels_for(device: torch.device) -> None:
    """Raises, naming the fix, when the extension has no kernels for this
    device's type (a build without nvcc meets a GPU). Cheap after the first
    call per device type."""
    if device.type in _checked or device.type in ("cpu", "meta"):
        return
    key = {"cuda": "CUDA"}.get(device.type)
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(f"{_LIBRARY}::bn_relu", key):
        record = built_with() or {}
        why = (
            "it was built without CUDA kernels (nvcc was not found, or DENSENET_EFFICIENT_CUDA=0)"
            if device.type == "cuda" and record.get("cuda_kernels") is False
            else f"it has no kernels for {device.type} devices"
        )
        raise RuntimeError(
            f"densenet_efficient cannot run on {device}: {why}. Rebuild where nvcc is found (set CUDA_HOME) "
            f"with {REBUILD}, or use mode='naive'/'checkpoint', which need no kernels of ours"
        )
    _checked.add(device.type)
