"""Channels-last CPU maps whose convolution weights outweigh the maps: in
float32 and float64 a block's k×k (k×k×k) backward runs as GEMMs over
zero-padded grids, one per tap for each gradient (csrc/cpu/shifted_taps.h),
not through oneDNN, whose channels-last backward adds two copies of the
weight gradient and a reordered weight. The sizes below (bottleneck of 64
channels, 16 new ones, 4³ or 7×9 maps at batch 2) take that path: they
match the reference in float64 for either weight layout, stay within twice
naive's error in float32 (and under bfloat16 autocast, which stays with
oneDNN), call no ATen convolution backward, and a step allocates less at
its peak than in NCDHW."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import assert_results_close, make_pair, rel_error, step_results
from densenet_efficient.allocations import allocation_peak

FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}
SPATIAL = [pytest.param((7, 9), id="7x9"), pytest.param((4, 4, 4), id="4x4x4")]
LAYERS, IN_CHANNELS, GROWTH = 3, 16, 16


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=FORMATS[t.dim() - 2])


def _maps(spatial, channels, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return _channels_last(torch.randn(2, channels, *spatial, dtype=dtype, generator=generator))


def _scrambled(weight: torch.Tensor) -> torch.Tensor:
    """The weight's values, densely stored in another dimension order
    (kh, C_out, …, C_in): neither contiguous nor channels last."""
    order = [2, 0, *range(3, weight.dim()), 1]
    stored = torch.empty([weight.shape[d] for d in order], dtype=weight.dtype)
    scrambled = stored.permute([order.index(d) for d in range(weight.dim())])
    return scrambled.copy_(weight)


def _blocks(spatial, dtype=torch.float64, weights="channels-last"):
    ours, reference = make_pair(LAYERS, IN_CHANNELS, GROWTH, dtype=dtype, spatial_dims=len(spatial))
    if weights == "channels-last":
        ours.to(memory_format=FORMATS[len(spatial)])
    elif weights == "scrambled":
        for name, parameter in ours.named_parameters():
            if name.endswith("conv2.weight"):
                parameter.data = _scrambled(parameter.data)
    return ours, reference


OUT_CHANNELS = IN_CHANNELS + LAYERS * GROWTH


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("weights", ["channels-last", "contiguous", "scrambled"])
def test_matches_the_reference_float64(spatial, weights):
    ours, reference = _blocks(spatial, weights=weights)
    x, grad = _maps(spatial, IN_CHANNELS), _maps(spatial, OUT_CHANNELS, seed=1)
    mine = step_results(ours, x, grad)
    parameters = dict(ours.named_parameters())
    for name, value in mine.items():
        if name.endswith("conv2.weight.grad"):  # laid out as its weight
            assert value.stride() == parameters[name.removesuffix(".grad")].stride(), name
    assert_results_close(mine, step_results(reference, x, grad), 1e-10)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_float32_and_bfloat16_within_twice_naive_error(spatial):
    exact = _blocks(spatial)[1]
    x, grad = _maps(spatial, IN_CHANNELS), _maps(spatial, OUT_CHANNELS, seed=1)
    expected = step_results(exact, x, grad)
    ours, naive = _blocks(spatial, dtype=torch.float32)
    mine, theirs = step_results(ours, x.float(), grad.float()), step_results(naive, x.float(), grad.float())
    for name in expected:
        if not name.endswith("num_batches_tracked"):
            assert rel_error(mine[name], expected[name]) <= 2 * rel_error(theirs[name], expected[name]) + 1e-6, name
    ours, naive = _blocks(spatial, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = step_results(ours, x.bfloat16(), grad.bfloat16())
        theirs = step_results(naive, x.bfloat16(), grad.bfloat16())
    for name in ("output", "input.grad", "denselayer1.conv2.weight.grad", "denselayer3.conv2.weight.grad"):
        assert rel_error(mine[name], expected[name]) <= 2 * rel_error(theirs[name], expected[name]) + 1e-3, name


@pytest.mark.parametrize("spatial", SPATIAL)
def test_no_aten_convolution_backward_runs(spatial):
    ours, _ = _blocks(spatial, dtype=torch.float32)
    x, grad = _maps(spatial, IN_CHANNELS, torch.float32), _maps(spatial, OUT_CHANNELS, torch.float32, seed=1)
    out = ours(x.requires_grad_())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(grad)
    calls = sum(event.count for event in prof.key_averages() if event.key == "aten::convolution_backward")
    assert calls == 0


def test_the_step_peak_is_lower_than_in_ncdhw():
    """3×3×3 backward at 4³ (bottleneck 128, growth 32, as in MONAI's
    DenseNet121's second block at 32³), a fresh process: through oneDNN a
    channels-last step peaked at 2949 KiB with the weight gradient first
    (3299 with both in one call), NCDHW at 2954; by shifted taps at 2227."""
    peaks = {}
    for layout in ("contiguous", "channels_last"):
        block, _ = make_pair(4, 32, 32, dtype=torch.float32, spatial_dims=3)
        x = torch.randn(2, 32, 4, 4, 4)
        if layout == "channels_last":
            block.to(memory_format=torch.channels_last_3d)
            x = _channels_last(x)
        x.requires_grad_()

        def step():
            block.zero_grad(set_to_none=True)
            block(x).square().mean().backward()

        step()
        _, peaks[layout] = allocation_peak(step)
    assert peaks["channels_last"] < peaks["contiguous"], peaks
