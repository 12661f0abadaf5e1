"""What the compiled extension (densenet_efficient._C) was built against,
as setup.py recorded it next to the extension: the torch version, whether
CUDA kernels were compiled and for which GPU architectures. Used to explain
an extension that does not load, or lacks a device's kernels."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = [
    "REBUILD", "built_with", "cuda_kernels_registered", "extension_load_error", "record_kernel_devices",
    "require_kernels_for",
]

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


def _has_kernels(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_LIBRARY}::bn_relu", dispatch_key)


def cuda_kernels_registered() -> bool:
    return _has_kernels("CUDA")


# The device types the loaded extension has kernels for ("meta": the fake
# kernels _ops.py registers), read once when it loads. require_kernels_for then
# is a lookup in a constant set, which torch.compile traces; the dispatcher
# query itself would break the graph (or fail under fullgraph=True).
_kernel_device_types: frozenset[str] = frozenset()


def record_kernel_devices() -> None:
    """Reads which device types have kernels; _ops.py calls it once the
    extension is loaded."""
    global _kernel_device_types
    _kernel_device_types = frozenset(
        {"meta"} | {device for device, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_kernels(key)}
    )


def require_kernels_for(device: torch.device) -> None:
    """Raises, naming the fix, when the extension has no kernels for this
    device's type (a build without nvcc meets a GPU)."""
    if device.type in _kernel_device_types:
        return
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
