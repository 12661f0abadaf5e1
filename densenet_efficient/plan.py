"""``python -m densenet_efficient plan``: will this model train at this batch
size in this much memory? Predicted peak per mode, and the largest batch
that fits (``densenet_efficient.memory.estimate_training_step``)."""

from __future__ import annotations

import argparse

import torch

from . import builders
from .arguments import model_name, parse_memory, positive_int
from .memory import estimate_training_step

MODES = (("naive", False), ("checkpoint", False), ("efficient", False), ("efficient+recompute", True))
DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=model_name,
                        help="e.g. densenet_bc_250_24, densenet121, densenet_bc-148-12, monai:DenseNet121")
    parser.add_argument("--batch", required=True, type=positive_int)
    parser.add_argument("--memory", required=True, type=parse_memory, help="e.g. 16GiB, 80GB")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16/fp16: autocast training, fp32 parameters")
    parser.add_argument("--input-size", type=positive_int,
                        help="side length; default: 32 for CIFAR models, 96 for volumes, 224 otherwise")
    parser.add_argument("--spatial-dims", type=int, choices=[1, 2, 3], default=2,
                        help="2: images [N, C, H, W] (default); 3: volumes [N, C, D, H, W]; 1: sequences")
    parser.add_argument("--in-channels", type=positive_int, default=3, help="channels of the input (default 3)")


def largest_batch(fits, limit: int = 1 << 20) -> int:
    """The largest batch b with fits(b), fits being monotone; 0 if none."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def run(args: argparse.Namespace) -> None:
    autocast_dtype = DTYPES[args.dtype]
    size = args.input_size or builders.default_input_size(args.model, args.spatial_dims)
    spatial = [size] * args.spatial_dims
    print(
        f"{args.model}, batch {args.batch}, input {args.in_channels}x{'x'.join(map(str, spatial))}, "
        f"{args.dtype} training (SGD with momentum), memory {args.memory / 2**30:.2f} GiB"
    )
    header = f"{'mode':<22}{'predicted peak':>16}{'fits':>6}{'largest batch':>15}"
    print(header)
    print("-" * len(header))
    for mode_name, recompute in MODES:
        with torch.device("meta"):  # structure only: nothing is allocated
            model = builders.builder(args.model)(
                mode=mode_name.split("+")[0], recompute_bottleneck=recompute, spatial_dims=args.spatial_dims,
                in_channels=args.in_channels,
            )

        def peak_at(batch, model=model):
            shape = (batch, args.in_channels, *spatial)
            return estimate_training_step(model, shape, autocast_dtype=autocast_dtype).total

        peak = peak_at(args.batch)
        fits = lambda b: peak_at(b) <= args.memory  # noqa: E731
        print(f"{mode_name:<22}{peak / 2**30:>12.2f} GiB{'yes' if peak <= args.memory else 'no':>6}{largest_batch(fits):>15}")
    print(
        "\nPredicted peak = parameters + gradients + momentum + activations (saved tensors exact, "
        "transients modelled); convolution workspaces are not included."
    )
