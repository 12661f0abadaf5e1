"""Small maps on the CPU: a block's k×k (k×k×k) convolutions over maps of 2
to 16 pixels run as GEMMs over their tap columns (csrc/cpu/tap_columns.h),
not through oneDNN. The columns follow the weight's layout (channel-major for
a contiguous weight, tap-major for a channels-last one) and the output the
input's: every combination, in 1-D, 2-D and 3-D, matches the reference, and
the step runs no ATen convolution."""

import pytest
import torch
from torch.func import functional_call

from conftest import assert_results_close, make_pair, step_results

FLOAT64_TOL = 1e-10
FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}

SPATIAL = [
    pytest.param((2,), id="1d-2"),
    pytest.param((16,), id="1d-16"),
    pytest.param((2, 2), id="2x2"),
    pytest.param((3, 5), id="3x5"),
    pytest.param((4, 4), id="4x4"),
    pytest.param((1, 2, 3), id="1x2x3"),
    pytest.param((2, 2, 2), id="2x2x2"),
    pytest.param((2, 2, 4), id="2x2x4"),
]


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=FORMATS[t.dim() - 2]) if channels_last else t


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("channels_last_weights", [False, True], ids=["weights-contiguous", "weights-channels-last"])
@pytest.mark.parametrize("channels_last_input", [False, True], ids=["input-contiguous", "input-channels-last"])
@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_the_reference_float64(spatial, channels_last_weights, channels_last_input, bn_size, training):
    if len(spatial) == 1 and (channels_last_weights or channels_last_input):
        pytest.skip("sequences have no channels-last layout")
    ours, reference = make_pair(3, 5, 3, bn_size, drop_rate=0.2, spatial_dims=len(spatial))
    for block in (ours, reference):
        block.train(training)
        if channels_last_weights:
            block.to(memory_format=FORMATS[len(spatial)])
    x = _layout(torch.randn(3, 5, *spatial, dtype=torch.float64), channels_last_input)
    grad = _layout(torch.randn(3, 14, *spatial, dtype=torch.float64), channels_last_input)
    mine = step_results(ours, x, grad)
    assert mine["output"].is_contiguous(memory_format=FORMATS[len(spatial)] if channels_last_input else
                                        torch.contiguous_format)
    assert_results_close(mine, step_results(reference, x, grad), FLOAT64_TOL)


@pytest.mark.parametrize("spatial", [(2, 3), (2, 2, 2)], ids=["2x3", "2x2x2"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("bn_size", [2, 0], ids=["bottleneck", "plain"])
def test_gradcheck(spatial, channels_last, bn_size):
    block = make_pair(2, 3, 2, bn_size=bn_size, spatial_dims=len(spatial))[0]
    if channels_last:
        block.to(memory_format=FORMATS[len(spatial)])
    names = [name for name, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())
    x = _layout(torch.randn(2, 3, *spatial, dtype=torch.float64), channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, *p: functional_call(block, dict(zip(names, p)), (x,)), (x, *params))


def _aten_convolutions(block, x) -> list[str]:
    x = x.clone().requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        block(x).sum().backward()
    return [e.name for e in profile.events() if "convolution" in e.name and e.name.startswith("aten::")]


@pytest.mark.parametrize("spatial", [(2, 2), (4, 4), (2, 2, 2)], ids=["2x2", "4x4", "2x2x2"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_a_step_over_small_maps_runs_no_aten_convolution(spatial, channels_last):
    block = make_pair(2, 4, 3, dtype=torch.float32, spatial_dims=len(spatial))[0].float()
    x = torch.randn(2, 4, *spatial)
    if channels_last:
        block.to(memory_format=FORMATS[len(spatial)])
        x = _layout(x, True)
    assert _aten_convolutions(block, x) == []
    # Above 16 pixels the convolutions are ATen's again.
    wider = torch.randn(2, 4, *spatial[:-1], 9)
    assert "aten::convolution_backward" in _aten_convolutions(block, _layout(wider, channels_last))
