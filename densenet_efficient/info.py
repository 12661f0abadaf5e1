"""``python -m densenet_efficient info``: what this installation can run:
torch and its build, what the extension was built against (CUDA kernels,
GPU architectures), the devices visible, and the kernels registered per
device for each of our operators."""

from __future__ import annotations

import platform

import torch

from .build_info import built_with, cuda_kernels_registered

_OPERATORS = ("channel_stats", "copy_with_stats", "bn_relu", "bn_relu_backward", "update_running_stats",
              "dense_block_forward", "transition_forward", "stem_forward")


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"densenet_efficient::{op}", key)


def lines() -> list[str]:
    from . import _ops  # noqa: F401  (loads the extension, or explains why it cannot)

    record = built_with()
    out = [
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'})",
    ]
    if record is None:
        out.append("extension: loaded; no build record (built by other means than setup.py)")
    else:
        archs = ", ".join(record["cuda_architectures"]) or "none"
        out.append(
            f"extension: built against torch {record['torch']}"
            + ("" if record["torch"] == torch.__version__ else f" (NOT the installed {torch.__version__}: rebuild)")
            + f"; CUDA kernels: {'yes, for ' + archs if record['cuda_kernels'] else 'no'}"
        )
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            arch = f"sm_{major}{minor}"
            covered = record is not None and arch in record["cuda_architectures"]
            out.append(f"cuda:{index}: {torch.cuda.get_device_name(index)} ({arch}"
                       + (", machine code built for it)" if covered else ", no machine code built for it)"))
    else:
        out.append("GPUs: none visible" + (" (this torch has no CUDA)" if torch.version.cuda is None else ""))
    keys = ["CPU", "CUDA"]
    out.append("kernels: " + "; ".join(
        f"{key}: " + ("all" if all(_has_kernel(op, key) or _has_kernel(op, "CompositeExplicitAutograd")
                                   for op in _OPERATORS) else "missing") for key in keys))
    if not cuda_kernels_registered() and torch.cuda.is_available():
        out.append("note: a GPU is visible but the extension has no CUDA kernels: efficient mode will refuse it")
    return out


def run() -> None:
    print("\n".join(lines()))
