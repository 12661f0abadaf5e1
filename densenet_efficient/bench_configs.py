"""What the bench command runs: the ways of running a model (modes), the
precisions and memory formats, the default rows per device, and the input
a configuration describes."""

from __future__ import annotations

import re
from typing import NamedTuple

class Variant(NamedTuple):
    """How a configuration runs the model."""

    mode: str  # of the blocks, transitions and stem
    recompute: bool = False  # recompute_bottleneck
    compiled: bool = False  # torch.compile
    memory_budget: float | None = None  # torch._functorch.config.activation_memory_budget


MODES = {
    "naive": Variant("naive"),
    "checkpoint": Variant("checkpoint"),
    "efficient": Variant("efficient"),
    "efficient+recompute": Variant("efficient", recompute=True),
    "compiled-naive": Variant("naive", compiled=True),
    # The partitioner then recomputes cat, BatchNorm and ReLU everywhere: the strongest peer.
    "compiled-naive-lowmem": Variant("naive", compiled=True, memory_budget=0.05),
    "compiled-efficient": Variant("efficient", compiled=True),
    "compiled-efficient-lowmem": Variant("efficient", compiled=True, memory_budget=0.05),
    "compiled-efficient+recompute-lowmem": Variant("efficient", recompute=True, compiled=True, memory_budget=0.05),
}
# Rows after the default models: the whole ImageNet model at a CPU's size,
# and a 3-D model (MONAI's DenseNet121 on single-channel volumes, when MONAI
# is installed).
WHOLE_MODEL_ROW = {"model": "densenet121", "input_size": 128, "batch": 8}
VOLUME_ROW = {"model": "monai:DenseNet121", "spatial_dims": 3, "in_channels": 1, "batch": 2, "needs": "monai"}
# The strongest peer on the CPU's smallest model: compiling it takes about a
# minute on 2 cores with an empty inductor cache, densenet121 three and a half.
CPU_COMPILED_PEER_ROW = {"model": "densenet_bc-40-12", "input_size": 32, "batch": 4,
                         "modes": ["compiled-naive-lowmem"]}
# The CPU default (make demo) runs in about 5 minutes on 2 cores (README).
CPU_DEFAULT = {
    "models": [f"densenet_bc-{depth}-12" for depth in (40, 100, 250)],
    "modes": ["naive", "checkpoint", "efficient", "efficient+recompute"],
    "batch": [4],
    "steps": 3,
    "warmup": 1,
    "extra": [CPU_COMPILED_PEER_ROW, WHOLE_MODEL_ROW, dict(VOLUME_ROW, input_size=32)],
}
CUDA_DEFAULT = {
    "models": ["densenet_bc_100_12", "densenet_bc_250_24", "densenet_bc_190_40", "densenet121", "densenet264"],
    "modes": ["naive", "checkpoint", "efficient", "efficient+recompute", "compiled-naive", "compiled-naive-lowmem"],
    "batch": [64],
    "steps": 20,
    "warmup": 5,
    "extra": [dict(VOLUME_ROW, input_size=96)],
}
# Fewer timed steps than this and a spread is min-max, not p10-p90.
PERCENTILE_STEPS = 10
# fp32: no autocast; the others run the model under torch.autocast in that dtype.
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
# The model and its input in the contiguous (NCHW) or channels-last (NHWC, or
# NDHWC for volumes) memory format.
LAYOUTS = ("contiguous", "channels_last")


def _input_of(config: dict) -> tuple[int, int]:
    """(channels, spatial dims) of a configuration's input; images of 3
    channels unless it says otherwise."""
    return config.get("in_channels", 3), config.get("spatial_dims", 2)


def input_shape(config: dict) -> tuple[int, ...]:
    """[N, C_in, *spatial] of a configuration's input."""
    channels, dims = _input_of(config)
    return (config["batch"], channels, *[config["input_size"]] * dims)


def input_label(config: dict) -> str:
    """The input of one sample, e.g. 3×32² or 1×32³."""
    channels, dims = _input_of(config)
    power = {1: "", 2: "²", 3: "³"}[dims]
    return f"{channels}×{config['input_size']}{power}"


def depth_of(model: str) -> int | None:
    match = re.search(r"(\d+)[-_](\d+)$", model)
    return int(match.group(1)) if match else None


def layout_of(config: dict):
    """The torch.memory_format of a configuration's layout for its rank."""
    import torch

    if config.get("layout", "contiguous") == "contiguous":
        return torch.contiguous_format
    return {2: torch.channels_last, 3: torch.channels_last_3d}[_input_of(config)[1]]


def layout_label(config: dict) -> str:
    """NCHW/NHWC (NCDHW/NDHWC for volumes, NCL for sequences)."""
    dims = _input_of(config)[1]
    spatial = {1: "L", 2: "HW", 3: "DHW"}[dims]
    return "N" + (spatial + "C" if config.get("layout") == "channels_last" else "C" + spatial)
