"""Bad input gets a clear error naming what was expected and what was given,
and leaves running statistics and every other buffer untouched."""

import re

import pytest
import torch
from torch import nn

import densenet_efficient as de
from conftest import make_pair


def snapshot(block):
    return {k: v.clone() for k, v in block.state_dict().items()}


def assert_unchanged(block, before):
    after = block.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed by a rejected call"


def rejected(block, x, error, pattern):
    before = snapshot(block)
    with pytest.raises(error, match=pattern):
        block(x)
    assert_unchanged(block, before)


@pytest.fixture(params=de.MODES)
def block(request):
    return make_pair(3, 5, 2, mode=request.param)[0]


def test_wrong_channel_count(block):
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    rejected(block, x, ValueError, r"expected an input with 5 channels \(num_input_features\), got 6")


def test_input_rank_must_be_the_layers(block):
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    rejected(
        block, x, ValueError,
        r"expected a 4-D input \[N, C, H, W\] \(the layers' convolutions are Conv2d\), got a 3-D tensor of shape \(2, 5, 4\)",
    )


@pytest.mark.parametrize("mode", de.MODES)
def test_a_volume_block_refuses_images(mode):
    block = make_pair(2, 5, 2, mode=mode, spatial_dims=3)[0]
    rejected(
        block, torch.randn(2, 5, 4, 4, dtype=torch.float64), ValueError,
        r"expected a 5-D input \[N, C, D, H, W\] \(the layers' convolutions are Conv3d\), got a 4-D tensor",
    )


def test_not_a_tensor(block):
    rejected(block, [torch.randn(2, 5, 4, 4)], TypeError, r"expected a Tensor input, got list")


def test_dtype_different_from_parameters(block):
    x = torch.randn(2, 5, 4, 4, dtype=torch.float32)
    rejected(block, x, TypeError, r"expected input of dtype torch.float64 \(the parameters' dtype\), got torch.float32")


def test_a_layer_in_another_dtype_outside_autocast():
    """Outside autocast every convolution takes the input's dtype, as naive
    mode's must: a bfloat16 block cast only in part is refused, naming the
    layer (the operator itself takes float32 weights beside bfloat16 maps,
    for autocast)."""
    block = make_pair(3, 5, 2, mode="efficient", dtype=torch.bfloat16)[0]
    block.denselayer2.conv2.float()
    rejected(block, torch.randn(2, 5, 4, 4, dtype=torch.bfloat16), TypeError,
             r"denselayer2\.conv2\.weight has dtype torch.float32 but the input has dtype torch.bfloat16")


def test_tensors_on_different_devices(block):
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64, device="meta")
    rejected(
        block, x, RuntimeError,
        r"expected all tensors on the same device: the input is on meta, the parameters on cpu",
    )


def test_batch_of_one_value_per_channel_in_training(block):
    x = torch.randn(1, 5, 1, 1, dtype=torch.float64)
    rejected(block, x, ValueError, re.escape("Expected more than 1 value per channel when training, got input size torch.Size([1, 5, 1, 1])"))


def test_batch_of_one_is_fine_in_eval(block):
    block.eval()
    assert block(torch.randn(1, 5, 1, 1, dtype=torch.float64)).shape == (1, 5 + 3 * 2, 1, 1)


@pytest.mark.parametrize(
    "replace, pattern",
    [
        pytest.param(
            lambda layer: setattr(layer, "norm1", nn.BatchNorm2d(layer.norm1.num_features, affine=False).double()),
            r"denselayer2.norm1 = nn.BatchNorm2d\(affine=True\).*got BatchNorm2d\(7, .*affine=False",
            id="bn-without-affine",
        ),
        pytest.param(
            lambda layer: setattr(layer, "norm2", nn.GroupNorm(2, layer.norm2.num_features).double()),
            r"denselayer2.norm2 = nn.BatchNorm2d\(affine=True\).*got GroupNorm",
            id="group-norm",
        ),
        pytest.param(
            lambda layer: setattr(layer, "relu1", nn.SiLU()),
            r"denselayer2.relu1 to be nn.ReLU; got SiLU",
            id="not-relu",
        ),
        pytest.param(
            lambda layer: setattr(layer, "conv1", nn.Conv2d(7, 16, 1, bias=True).double()),
            r"denselayer2.conv1 to be nn.Conv2d\(kernel_size=1, stride=1, padding=0, bias=False\)",
            id="conv-with-bias",
        ),
    ],
)
def test_unsupported_layer_configuration(replace, pattern):
    block = make_pair(3, 5, 2)[0]
    replace(block.denselayer2)
    rejected(block, torch.randn(2, 5, 4, 4, dtype=torch.float64), ValueError, pattern)


@pytest.mark.parametrize(
    "replace, pattern",
    [
        pytest.param(
            lambda layer: setattr(layer, "norm1", nn.BatchNorm2d(layer.norm1.num_features).double()),
            r"denselayer2.norm1 = nn.BatchNorm3d\(affine=True\).*got BatchNorm2d\(7,",
            id="2d-norm",
        ),
        pytest.param(
            lambda layer: setattr(layer, "conv2", nn.Conv2d(8, 2, 3, padding=1, bias=False).double()),
            r"denselayer2.conv2 to be nn.Conv3d\(kernel_size=3, stride=1, padding=1, bias=False\); got Conv2d",
            id="2d-conv",
        ),
        pytest.param(
            lambda layer: setattr(layer, "conv2", nn.Conv3d(8, 2, (1, 3, 3), padding=(0, 1, 1), bias=False).double()),
            r"denselayer2.conv2 to be nn.Conv3d\(kernel_size=3, stride=1, padding=1, bias=False\); got Conv3d\(8, 2, kernel_size=\(1, 3, 3\)",
            id="anisotropic-kernel",
        ),
    ],
)
def test_unsupported_volume_layer_configuration(replace, pattern):
    block = make_pair(3, 5, 2, spatial_dims=3)[0]
    replace(block.denselayer2)
    rejected(block, torch.randn(2, 5, 3, 4, 4, dtype=torch.float64), ValueError, pattern)


def test_volume_of_one_value_per_channel_in_training():
    block = make_pair(2, 5, 2, spatial_dims=3)[0]
    rejected(
        block, torch.randn(1, 5, 1, 1, 1, dtype=torch.float64), ValueError,
        re.escape("Expected more than 1 value per channel when training, got input size torch.Size([1, 5, 1, 1, 1])"),
    )


def test_mixed_dropout_rates_are_rejected():
    block = make_pair(3, 5, 2, drop_rate=0.2)[0]
    block.denselayer3.drop_rate = 0.5
    rejected(block, torch.randn(2, 5, 4, 4, dtype=torch.float64), ValueError, r"same effective dropout rate")


def test_num_layers_must_be_positive():
    with pytest.raises(ValueError, match="num_layers must be at least 1, got 0"):
        de.DenseBlock(0, 4, 2)


def test_errors_leave_running_stats_of_a_trained_block_alone():
    """The check happens before the first norm, also after real updates."""
    block = make_pair(3, 5, 2)[0]
    block(torch.randn(4, 5, 3, 3, dtype=torch.float64))
    rejected(block, torch.randn(4, 6, 3, 3, dtype=torch.float64), ValueError, "5 channels")
