"""The stretches outside the dense blocks as single operators: a transition
(BN-ReLU-Conv1x1-AvgPool2, pooled before the convolution) and the stem's
BN-ReLU-MaxPool, against the same modules run one by one (float64), with
gradcheck, opcheck, bad input, and what they keep for backward."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import DEVICES, assert_results_close, randomize_norms, rel_error, step_results
from densenet_efficient import models
from densenet_efficient._ops import ops
from densenet_efficient.fused import stem_fusable, transition_fusable
from densenet_efficient.memory import saved_tensor_bytes
from densenet_efficient.reference import BATCH_NORM, CONV

FLOAT64_TOL = 1e-10
# Odd sizes (a last row in no pooling window) and even ones (every value in
# one window, which the transition's backward spreads itself).
SPATIAL = [pytest.param((7, 5), id="2d-odd"), pytest.param((4, 6, 5), id="3d"), pytest.param((9,), id="1d"),
           pytest.param((2, 2), id="2d-one-pooled-pixel"), pytest.param((6, 4), id="2d-even"),
           pytest.param((4, 6, 2), id="3d-even"), pytest.param((8,), id="1d-even")]
MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def _transition(spatial_dims, channels=6, out=3, seed=0):
    torch.manual_seed(seed)
    module = models.Transition(channels, out, spatial_dims, mode="efficient").double()
    randomize_norms(module, torch.Generator().manual_seed(seed + 1))
    return module


def _stem(spatial_dims, channels=4, seed=0):
    torch.manual_seed(seed)
    stem = OrderedDict([
        ("conv0", CONV[spatial_dims](2, channels, kernel_size=3, stride=2, padding=1, bias=False)),
        ("norm0", BATCH_NORM[spatial_dims](channels)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", MAX_POOL[spatial_dims](kernel_size=3, stride=2, padding=1)),
    ])
    features = models.DenseNetFeatures(stem, mode="efficient").double()
    randomize_norms(features, torch.Generator().manual_seed(seed + 1))
    return features


def _naive(module):
    twin = copy.deepcopy(module)
    twin.mode = "naive"
    return twin


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_transition_matches_its_modules(device, spatial, training):
    fused = _transition(len(spatial)).train(training).to(device)
    assert fused.fused()
    naive = _naive(fused)
    x = torch.randn(3, 6, *spatial, dtype=torch.float64, device=device)
    grad = torch.randn(3, 3, *[s // 2 for s in spatial], dtype=torch.float64, device=device)
    assert_results_close(step_results(fused, x, grad), step_results(naive, x, grad), FLOAT64_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial", [(9, 8), (5, 6, 7), (11,)], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_stem_matches_its_modules(device, spatial, training):
    fused = _stem(len(spatial)).train(training).to(device)
    assert [len(stage) for stage in fused.stages()] == [4]
    naive = _naive(fused)
    assert [len(stage) for stage in naive.stages()] == [1, 1, 1, 1]
    x = torch.randn(3, 2, *spatial, dtype=torch.float64, device=device)
    grad = torch.randn_like(copy.deepcopy(naive)(x))  # a copy: its running statistics must not move
    assert_results_close(step_results(fused, x, grad), step_results(naive, x, grad), FLOAT64_TOL)


def test_momentum_none_and_untracked_norms():
    fused = _transition(2)
    fused.norm.momentum = None
    naive = _naive(fused)
    for _ in range(3):
        x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
        assert_results_close(step_results(fused, x, torch.ones(2, 3, 2, 2, dtype=torch.float64)),
                             step_results(naive, x, torch.ones(2, 3, 2, 2, dtype=torch.float64)), FLOAT64_TOL)
    untracked = _transition(2)
    untracked.norm = nn.BatchNorm2d(6, track_running_stats=False).double()
    untracked.eval()  # no running statistics: batch statistics in eval too
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    assert (untracked(x) - _naive(untracked)(x)).abs().max() <= 1e-12


def test_layouts_other_than_the_fused_one_run_their_modules():
    module = _transition(2)
    module.pool = nn.AvgPool2d(3, stride=2)
    assert not transition_fusable(module) and not module.fused()
    module = _transition(2)
    module.norm = nn.SyncBatchNorm(6).double()
    assert not module.fused()
    conv = nn.Conv2d(2, 3, 3, bias=False)
    assert stem_fusable(conv, nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(3))
    assert not stem_fusable(conv, nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(3, ceil_mode=True))
    assert not stem_fusable(conv, nn.BatchNorm2d(3, affine=False), nn.ReLU(), nn.MaxPool2d(3))
    assert not stem_fusable(nn.Conv2d(2, 3, 3, bias=True), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(3))


def test_gradcheck_transition_and_stem():
    for training in (True, False):
        transition = _transition(2, channels=3, out=2).train(training)
        params = (transition.norm.weight, transition.norm.bias, transition.conv.weight)
        for spatial in ((4, 3), (4, 6)):  # odd and even sizes
            x = torch.randn(2, 3, *spatial, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda x, *p: transition(x), (x, *params))
        stem = _stem(2, channels=3).train(training)
        image = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
        params = (stem.conv0.weight, stem.norm0.weight, stem.norm0.bias)
        assert torch.autograd.gradcheck(lambda image, *p: stem(image), (image, *params))


def test_opcheck_transition_and_stem_ops():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=generator)
    weight, bias = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    running = [torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5]
    conv = torch.randn(2, 4, 1, 1, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, conv)]
    for stats in ([], running):
        torch.library.opcheck(ops.transition_forward.default, (*leaves[:3], stats, 1e-5, leaves[3]))
        output, mean, var, _ = ops.transition_forward(x, weight, bias, stats, 1e-5, conv)
        torch.library.opcheck(ops.transition_backward.default,
                              (torch.randn_like(output), x, weight, bias, stats, 1e-5, conv, mean, var))
        window = ([3, 3], [2, 2], [1, 1])
        image = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=generator)
        conv0 = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=generator)
        stem_args = ([2, 2], [1, 1], weight, bias, stats, 1e-5, *window)
        torch.library.opcheck(ops.stem_forward.default,
                              (image.clone().requires_grad_(), conv0.clone().requires_grad_(), *stem_args))
        output, mean, var, _ = ops.stem_forward(image, conv0, *stem_args)
        for image_grad in (True, False):
            torch.library.opcheck(ops.stem_backward.default,
                                  (torch.randn_like(output), image, conv0, *stem_args, mean, var, image_grad))


def test_opcheck_transition_and_stem_ops_with_float32_parameters_and_bfloat16_maps():
    """Autocast's mix: float32 norms and conv weights beside bfloat16 maps
    (the weights cast inside; their gradients in float32)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=generator).bfloat16()
    weight, bias, conv = torch.rand(4) + 0.5, torch.randn(4), torch.randn(2, 4, 1, 1)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, conv)]
    torch.library.opcheck(ops.transition_forward.default, (*leaves[:3], [], 1e-5, leaves[3]))
    output, mean, var, _ = ops.transition_forward(x, weight, bias, [], 1e-5, conv)
    grads = ops.transition_backward(torch.randn_like(output), x, weight, bias, [], 1e-5, conv, mean, var)
    assert output.dtype == torch.bfloat16 and grads[3].dtype == torch.float32
    torch.library.opcheck(ops.transition_backward.default,
                          (torch.randn_like(output), x, weight, bias, [], 1e-5, conv, mean, var))
    image = torch.randn(2, 3, 9, 8, generator=generator).bfloat16()
    conv0 = torch.randn(4, 3, 3, 3)
    stem_args = ([2, 2], [1, 1], weight, bias, [], 1e-5, [3, 3], [2, 2], [1, 1])
    torch.library.opcheck(ops.stem_forward.default, (image.clone().requires_grad_(), conv0.clone().requires_grad_(),
                                                     *stem_args))
    output, mean, var, _ = ops.stem_forward(image, conv0, *stem_args)
    assert ops.stem_backward(torch.randn_like(output), image, conv0, *stem_args, mean, var, True)[1].dtype == torch.float32
    torch.library.opcheck(ops.stem_backward.default,
                          (torch.randn_like(output), image, conv0, *stem_args, mean, var, True))


def test_a_conv_weight_in_another_dtype_is_refused():
    """The operators take the input's dtype or, beside half/bfloat16 maps,
    float32 (autocast); outside autocast the modules take only the input's."""
    x = torch.randn(2, 4, 6, 6)
    weight, bias, conv = torch.rand(4) + 0.5, torch.randn(4), torch.randn(2, 4, 1, 1, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"transition_forward: the conv weight has dtype Double but the input has "
                                        r"dtype Float; expected Float$"):
        ops.transition_forward(x, weight, bias, [], 1e-5, conv)
    stem_args = ([2, 2], [1, 1], weight, bias, [], 1e-5, [3, 3], [2, 2], [1, 1])
    with pytest.raises(TypeError, match=r"stem_forward: the conv weight has dtype Double but the input has dtype "
                                        r"BFloat16; expected BFloat16 or Float"):
        ops.stem_forward(torch.randn(2, 3, 9, 8).bfloat16(), torch.randn(4, 3, 3, 3).double(), *stem_args)
    transition = _transition(2, channels=4).float()
    with pytest.raises(TypeError, match=r"transition: the conv weight has dtype torch.float32 but the input has "
                                        r"dtype torch.bfloat16; outside autocast \(which leaves float64 alone\) they must share it"):
        transition(x.bfloat16())


def test_bad_input_is_refused_before_running_statistics_change():
    module = _transition(2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"transition: expected a 4-D input with 6 channels \(its BatchNorm2d\), got shape \(2, 5, 4, 4\)"):
        module(torch.randn(2, 5, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        module(torch.randn(1, 6, 1, 1, dtype=torch.float64))
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    with pytest.raises(ValueError, match=r"expected a 1×1 conv weight of shape \[out, 4, 1, \.\.\.\]"):
        ops.transition_forward(torch.randn(2, 4, 4, 4), torch.ones(4), torch.zeros(4), [], 1e-5,
                               torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"expected kernel_size with one value per spatial dimension \(2\), got \[3\]"):
        ops.stem_forward(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), [1, 1], [1, 1], torch.ones(4),
                         torch.zeros(4), [], 1e-5, [3], [2], [1])
    with pytest.raises(ValueError, match=r"expected a conv0 weight \[out, 3, \*kernel\] of 4 dimensions, got \[4, 2, 3, 3\]"):
        ops.stem_forward(torch.randn(2, 3, 8, 8), torch.randn(4, 2, 3, 3), [1, 1], [1, 1], torch.ones(4),
                         torch.zeros(4), [], 1e-5, [3, 3], [2, 2], [1, 1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_stages_keep_only_their_input_and_statistics(training):
    """A transition keeps its input (a block's output, kept anyway) and two
    per-channel vectors; the stem keeps the image and two vectors."""
    transition = _transition(2, channels=8, out=4).float().train(training)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    _, saved = saved_tensor_bytes(transition, x, ignore=[*transition.parameters(), *transition.buffers()])
    assert saved == x.numel() * 4 + (2 * 8 * 4 if training else 0)
    stem = _stem(2, channels=4).float().train(training)
    image = torch.randn(2, 2, 12, 12)
    _, saved = saved_tensor_bytes(stem, image, ignore=[*stem.parameters(), *stem.buffers()])
    assert saved == image.numel() * 4 + (2 * 4 * 4 if training else 0)


def test_converted_torchvision_densenet_fuses_its_transitions_and_stem():
    torchvision = pytest.importorskip("torchvision")
    import densenet_efficient as de
    from densenet_efficient.memory import model_saved_bytes

    torch.manual_seed(0)
    original = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 3, 2), num_init_features=8,
                                           num_classes=5).double()
    randomize_norms(original, torch.Generator().manual_seed(1))
    keys = list(original.state_dict())
    converted = de.convert(copy.deepcopy(original))
    assert list(converted.state_dict()) == keys
    features = converted.features
    assert isinstance(features, models.DenseNetFeatures) and len(features.stages()[0]) == 4
    assert all(m.fused() for m in features if isinstance(m, models.Transition)) and features.transition2.fused()
    x, grad = torch.randn(3, 3, 40, 40, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    for training in (True, False):
        original.train(training)
        converted.train(training)
        assert_results_close(step_results(converted, x, grad), step_results(original, x, grad), FLOAT64_TOL)
        twin = copy.deepcopy(converted)  # its forward moves running statistics
        _, saved = saved_tensor_bytes(twin, x, ignore=[*twin.parameters(), *twin.buffers()])
        assert saved == model_saved_bytes(twin, tuple(x.shape), dtype=torch.float64)
    de.convert(converted, mode="naive")
    assert not any(m.fused() for m in converted.features if isinstance(m, models.Transition))
    assert [len(s) for s in converted.features.stages()][:4] == [1, 1, 1, 1]


def test_stem_without_an_image_gradient_gives_the_same_parameter_gradients():
    fused = _stem(2)
    naive = _naive(fused)
    image = torch.randn(3, 2, 10, 9, dtype=torch.float64)  # no gradient asked for, as in training
    for module in (fused, naive):
        module(image).square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), naive.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-10 * q.grad.norm(), name


def test_modules_with_forward_hooks_run_unfused_and_container_hooks_survive_conversion():
    torchvision = pytest.importorskip("torchvision")
    import densenet_efficient as de

    model = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    seen = []
    model.features.norm0.register_forward_hook(lambda *args: seen.append("norm0"))
    model.features.transition1.conv.register_forward_hook(lambda *args: seen.append("conv"))
    model.features.register_forward_hook(lambda *args: seen.append("features"))
    de.convert(model)
    assert [len(stage) for stage in model.features.stages()][:4] == [1, 1, 1, 1]
    assert not model.features.transition1.fused()
    model(torch.randn(2, 3, 32, 32))
    assert seen == ["norm0", "conv", "features"]


def test_backward_hooks_on_the_parts_or_global_hooks_make_them_run_unfused():
    seen = []
    transition = _transition(2)
    transition.conv.register_full_backward_hook(lambda *args: seen.append("conv"))
    assert not transition.fused()
    stem = _stem(2)
    stem.pool0.register_full_backward_pre_hook(lambda *args: seen.append("pool0"))
    assert [len(stage) for stage in stem.stages()] == [1, 1, 1, 1]
    stem(transition(torch.randn(2, 6, 8, 8, dtype=torch.float64))[:, :2]).sum().backward()
    assert seen == ["pool0", "conv"]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not _transition(2).fused() and [len(stage) for stage in _stem(2).stages()] == [1, 1, 1, 1]
    finally:
        handle.remove()
    assert _transition(2).fused() and [len(stage) for stage in _stem(2).stages()] == [4]


@pytest.mark.parametrize("device", DEVICES)
def test_under_autocast_the_fused_stem_and_transition_cast_their_weights_inside(device):
    """Their float32 conv weights are cast inside the operators, in forward
    and again in backward, as a block's are: no bfloat16 copy is saved for
    backward (the modules save one per convolution), the weight gradients
    come back in float32, and the results are within twice the modules'
    error of float64 ones."""
    features = nn.Sequential(_stem(2), _transition(2, channels=4, out=3)).float().to(device)
    modules = copy.deepcopy(features)
    for part in modules:
        part.mode = "naive"
    exact = copy.deepcopy(modules).double()
    shapes = {tuple(p.shape) for name, p in features.named_parameters() if "conv" in name}
    image = torch.randn(3, 2, 20, 18, generator=torch.Generator().manual_seed(5)).to(device)

    def run(model, x):
        copies = []

        def pack(t):
            if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes:
                copies.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device, dtype=torch.bfloat16, enabled=x.dtype != torch.float64):
            output = model(x)
        output.float().square().sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        return output, grads, len(copies)

    output, grads, copies = run(features, image)
    their_output, their_grads, their_copies = run(modules, image)
    exact_output, exact_grads, _ = run(exact, image.double())
    assert (copies, their_copies) == (0, 2)
    assert output.dtype == their_output.dtype == torch.bfloat16
    assert rel_error(output, exact_output) <= 2 * rel_error(their_output, exact_output) + 1e-3
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert rel_error(grad, exact_grads[name]) <= 2 * rel_error(their_grads[name], exact_grads[name]) + 1e-3, name


def test_3d_stretches_under_cpu_autocast_run_their_modules():
    """CPU autocast pools 3-D in float32 (no bfloat16 kernels): the modules run."""
    fused, stem = _transition(3).float(), _stem(3).float()
    x, image = torch.randn(2, 6, 4, 4, 4, dtype=torch.bfloat16), torch.randn(2, 2, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fused(x), _naive(fused)(x)) and fused(x).dtype == torch.float32
        assert torch.equal(stem(image), _naive(stem)(image))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_a_non_dense_conv0_weight_gets_the_gradient_strides_its_fake_kernel_says(channels_last):
    """A conv0 weight with gaps (every other output channel of a larger
    one): its gradient is laid out as empty_like lays out such a weight,
    densely in its dimension order, by the operator and its fake kernel."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    conv0 = torch.randn(8, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=layout)[::2]
    assert not conv0.is_contiguous(memory_format=layout)
    image = torch.randn(2, 3, 9, 8, dtype=torch.float64).contiguous(memory_format=layout)
    weight, bias = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    stem_args = ([2, 2], [1, 1], weight, bias, [], 1e-5, [3, 3], [2, 2], [1, 1])
    output, mean, var, _ = ops.stem_forward(image, conv0, *stem_args)
    grads = ops.stem_backward(torch.randn_like(output), image, conv0, *stem_args, mean, var, True)
    assert grads[1].stride() == torch.empty_like(conv0).stride()
    torch.library.opcheck(ops.stem_backward.default,
                          (torch.randn_like(output), image, conv0, *stem_args, mean, var, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("image_channels", [3, 1])
@pytest.mark.parametrize("channels_last", ["weights", "input", "both"])
def test_results_are_in_the_layouts_the_fake_kernels_say(device, image_channels, channels_last):
    """The transition computes in its input's memory format whatever its
    weight's (a channels_last 1×1 weight's strides say channels_last though
    its memory is contiguous); the stem in the one ATen's convolution would
    give conv0's output: channels last when the image or conv0's weight is (a
    one-channel image or conv0 weight is contiguous and channels last at once:
    ATen takes it as contiguous, and so do we). Weight gradients come back
    with their weights' strides, which AccumulateGrad would otherwise copy
    them into. The fake kernels say the same. (float32 on CUDA: cuDNN never
    picks channels_last for float64.)"""
    on = dict(dtype=torch.float32 if device == "cuda" else torch.float64, device=device)
    channels_last_weights = channels_last in ("weights", "both")
    channels_last_input = channels_last in ("input", "both")

    def laid_out(t, is_channels_last):
        return t.contiguous(memory_format=torch.channels_last if is_channels_last else torch.contiguous_format)

    def has_layout(t, is_channels_last):
        return t.is_contiguous(memory_format=torch.channels_last if is_channels_last else torch.contiguous_format)

    x = laid_out(torch.randn(2, 4, 6, 6, **on), channels_last_input)
    weight, bias = torch.rand(4, **on) + 0.5, torch.randn(4, **on)
    conv = laid_out(torch.randn(2, 4, 1, 1, **on), channels_last_weights)
    torch.library.opcheck(ops.transition_forward.default, (x, weight, bias, [], 1e-5, conv))
    output, mean, var, _ = ops.transition_forward(x, weight, bias, [], 1e-5, conv)
    grads = ops.transition_backward(torch.randn_like(output), x, weight, bias, [], 1e-5, conv, mean, var)
    assert has_layout(output, channels_last_input) and has_layout(grads[0], channels_last_input)
    assert grads[3].stride() == conv.stride()
    torch.library.opcheck(ops.transition_backward.default,
                          (torch.randn_like(output), x, weight, bias, [], 1e-5, conv, mean, var))
    image = laid_out(torch.randn(2, image_channels, 9, 8, **on), channels_last_input)
    conv0 = laid_out(torch.randn(4, image_channels, 3, 3, **on), channels_last_weights)
    stem_args = ([2, 2], [1, 1], weight, bias, [], 1e-5, [3, 3], [2, 2], [1, 1])
    torch.library.opcheck(ops.stem_forward.default, (image, conv0, *stem_args))
    output, mean, var, _ = ops.stem_forward(image, conv0, *stem_args)
    grads = ops.stem_backward(torch.randn_like(output), image, conv0, *stem_args, mean, var, True)
    stem_channels_last = image_channels > 1
    assert has_layout(output, stem_channels_last) and has_layout(grads[0], stem_channels_last)
    assert grads[1].stride() == conv0.stride()
    torch.library.opcheck(ops.stem_backward.default,
                          (torch.randn_like(output), image, conv0, *stem_args, mean, var, True))
