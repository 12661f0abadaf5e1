"""Efficient blocks in channels-last models: a channels-last input (or a
model converted with .to(memory_format=torch.channels_last)) makes the block
buffer, scratches and gradient buffer NHWC (NDHWC for volumes); the
per-channel kernels walk channel slices of them in place and the 1×1
convolutions are one GEMM over all pixels (CPU). Everything that holds in
NCHW holds here: parity with the reference, gradcheck, saved bytes, float32
and autocast errors, compile, synchronised BatchNorm, and no higher peak.
Parity, gradcheck and precision run on CUDA too, where the kernels walk the
same channel rows."""

import copy

import pytest
import torch

from conftest import DEVICES, assert_results_close, make_pair, randomize_norms, rel_error, step_results
from densenet_efficient.allocations import allocation_peak
from densenet_efficient.memory import dense_block_saved_bytes, saved_tensor_bytes

FLOAT64_TOL = 1e-10
FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}
SPATIAL = {2: (5, 6), 3: (3, 4, 3)}


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=FORMATS[t.dim() - 2])


def is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=FORMATS[t.dim() - 2])


def in_the_computed_layout(t: torch.Tensor) -> bool:
    """Whether `t`, a result of an efficient module fed channels-last maps,
    is in the layout it computes in: channels last, but contiguous for
    volumes on CUDA (csrc/dense_block.h, block_memory_format)."""
    return is_channels_last(t) if t.dim() == 4 or t.device.type == "cpu" else t.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial_dims", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("options", [{}, {"drop_rate": 0.3}, {"recompute_bottleneck": True}, {"bn_size": 0}],
                         ids=["plain", "dropout", "recompute", "no-bottleneck"])
def test_a_channels_last_input_matches_the_reference(device, spatial_dims, training, options):
    ours, reference = (m.to(device) for m in make_pair(3, 5, 3, spatial_dims=spatial_dims, **options))
    ours.train(training)
    reference.train(training)
    spatial = SPATIAL[spatial_dims]
    x = channels_last(torch.randn(4, 5, *spatial, dtype=torch.float64, device=device))
    grad = channels_last(torch.randn(4, 14, *spatial, dtype=torch.float64, device=device))
    mine = step_results(ours, x, grad)
    assert in_the_computed_layout(mine["output"]) and in_the_computed_layout(mine["input.grad"])
    assert_results_close(mine, step_results(reference, x, grad), FLOAT64_TOL)


@pytest.mark.parametrize("drop_rate", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_a_channels_last_model_matches_the_reference_in_both_input_layouts(drop_rate):
    """The input's layout is the block's (and its output's, as torch.cat's
    for the reference); the weights' layout does not matter, but to dropout,
    which draws in the memory order of a naive layer's convolution output:
    channels last when the weight is."""
    for make_input in (lambda t: t, channels_last):
        ours, reference = make_pair(3, 5, 3, drop_rate=drop_rate)
        ours.to(memory_format=torch.channels_last)
        reference.to(memory_format=torch.channels_last)
        x = make_input(torch.randn(4, 5, 6, 6, dtype=torch.float64))
        grad = torch.randn(4, 14, 6, 6, dtype=torch.float64)
        mine, expected = step_results(ours, x, grad), step_results(reference, x, grad)
        assert is_channels_last(mine["output"]) == is_channels_last(x) == is_channels_last(expected["output"])
        assert_results_close(mine, expected, FLOAT64_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial_dims", [2, 3], ids=["2d", "3d"])
def test_gradcheck(device, spatial_dims):
    from torch.func import functional_call

    block = make_pair(2, 3, 2, bn_size=2, spatial_dims=spatial_dims)[0].to(device)
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())
    x = channels_last(torch.randn(2, 3, *[3] * spatial_dims, dtype=torch.float64, device=device)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, *p: functional_call(block, dict(zip(names, p)), (x,)), (x, *params))


@pytest.mark.parametrize("spatial_dims", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("options", [{}, {"drop_rate": 0.2}, {"recompute_bottleneck": True}],
                         ids=["plain", "dropout", "recompute"])
def test_saved_bytes_equal_the_model_and_the_contiguous_block(spatial_dims, options):
    shape = (2, 8, *SPATIAL[spatial_dims])
    saved = {}
    for layout in ("contiguous", "channels_last"):
        block, _ = make_pair(4, 8, 4, dtype=torch.float32, spatial_dims=spatial_dims, **options)
        x = torch.randn(shape, requires_grad=True)
        x = channels_last(x) if layout == "channels_last" else x
        _, saved[layout] = saved_tensor_bytes(block, x, ignore=[*block.parameters(), *block.buffers()])
    whole_channels = False
    expected = dense_block_saved_bytes(shape, 4, 4, dtype=torch.float32, drop_rate=options.get("drop_rate", 0.0),
                                       recompute_bottleneck=options.get("recompute_bottleneck", False),
                                       dropout_whole_channels=whole_channels)
    assert saved["channels_last"] == saved["contiguous"] == expected


@pytest.mark.parametrize("shape, layers, growth, model_too", [
    ((4, 16, 16, 16), 6, 8, False),
    # MONAI's 3-D DenseNet121 converted whole: its 3×3×3 weights channels
    # last too, whose gradients oneDNN copies twice on their way out.
    ((2, 16, 8, 8, 8), 4, 8, True),
])
def test_the_step_peak_is_no_higher_than_in_nchw(shape, layers, growth, model_too):
    """What a training step of a block allocates (CPU allocator, profiler)
    beyond what it keeps between steps, channels last against contiguous."""
    peaks = {}
    for layout in ("contiguous", "channels_last"):
        block, _ = make_pair(layers, shape[1], growth, dtype=torch.float32, spatial_dims=len(shape) - 2)
        x = torch.randn(*shape, requires_grad=True)
        if layout == "channels_last":
            x = channels_last(x.detach()).requires_grad_()
            if model_too:
                block = block.to(memory_format=FORMATS[len(shape) - 2])

        def step():
            block.zero_grad(set_to_none=True)
            block(x).square().mean().backward()

        step()
        _, peaks[layout] = allocation_peak(step)
    assert peaks["channels_last"] <= peaks["contiguous"], peaks


@pytest.mark.parametrize("device", DEVICES)
def test_float32_within_twice_naive_error(device):
    ours32, naive32 = (m.to(device) for m in make_pair(4, 8, 4, dtype=torch.float32))
    exact = make_pair(4, 8, 4)[1].to(device)
    generator = torch.Generator().manual_seed(3)
    x = channels_last(torch.randn(4, 8, 6, 6, dtype=torch.float64, generator=generator)).to(device)
    grad = channels_last(torch.randn(4, 24, 6, 6, dtype=torch.float64, generator=generator)).to(device)
    e = step_results(exact, x, grad)
    mine, theirs = step_results(ours32, x.float(), grad.float()), step_results(naive32, x.float(), grad.float())
    for name in e:
        if not name.endswith("num_batches_tracked"):
            assert rel_error(mine[name], e[name]) <= 2 * rel_error(theirs[name], e[name]) + 1e-6, name


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast_within_twice_naive_error(device):
    ours, naive = (m.to(device) for m in make_pair(4, 8, 4, dtype=torch.float32))
    exact = make_pair(4, 8, 4)[1].to(device)
    generator = torch.Generator().manual_seed(4)
    x = channels_last(torch.randn(4, 8, 6, 6, generator=generator)).to(device, torch.bfloat16)
    grad = channels_last(torch.randn(4, 24, 6, 6, generator=generator)).to(device, torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        mine, theirs = step_results(ours, x, grad), step_results(naive, x, grad)
    e = step_results(exact, x.double(), grad.double())
    assert is_channels_last(mine["output"]) and mine["output"].dtype == torch.bfloat16
    for name in ("output", "input.grad", "denselayer1.conv1.weight.grad", "denselayer3.norm1.weight.grad"):
        assert rel_error(mine[name], e[name]) <= 2 * rel_error(theirs[name], e[name]) + 1e-3, name


def test_compiles_into_a_full_graph():
    """The fake kernels give channels-last strides, as the kernels do."""
    block, _ = make_pair(2, 4, 2, dtype=torch.float32)
    eager = copy.deepcopy(block)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = channels_last(torch.randn(2, 4, 5, 5))
    grad = channels_last(torch.randn(2, 8, 5, 5))
    mine = {name.removeprefix("_orig_mod."): value for name, value in step_results(compiled, x, grad).items()}
    assert is_channels_last(mine["output"])
    assert_results_close(mine, step_results(eager, x, grad), 1e-5)


def test_synchronised_block_on_one_rank_equals_the_plain_block(one_rank_world):
    plain, _ = make_pair(3, 3, 2, bn_size=2)
    synced, _ = make_pair(3, 3, 2, bn_size=2)
    synced.sync_group = torch.distributed.group.WORLD.group_name
    x = channels_last(torch.randn(2, 3, 4, 5, dtype=torch.float64))
    grad = channels_last(torch.randn(2, 9, 4, 5, dtype=torch.float64))
    assert_results_close(step_results(synced, x, grad), step_results(plain, x, grad), FLOAT64_TOL)


# --- transitions, stem and whole models ---------------------------------------


def _fused_stages(spatial_dims):
    from test_fused import _stem, _transition

    return _transition(spatial_dims), _stem(spatial_dims)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial_dims", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_transition_and_stem_match_their_modules(device, spatial_dims, training):
    from test_fused import _naive

    transition, stem = (m.train(training).to(device) for m in _fused_stages(spatial_dims))
    naive_transition, naive = _naive(transition), _naive(stem)
    x = channels_last(torch.randn(3, 6, *[6] * spatial_dims, dtype=torch.float64, device=device))
    grad = channels_last(torch.randn(3, 3, *[3] * spatial_dims, dtype=torch.float64, device=device))
    mine = step_results(transition, x, grad)
    assert in_the_computed_layout(mine["output"]) and in_the_computed_layout(mine["input.grad"])
    assert_results_close(mine, step_results(naive_transition, x, grad), FLOAT64_TOL)
    image = channels_last(torch.randn(3, 2, *[9] * spatial_dims, dtype=torch.float64, device=device))
    grad = channels_last(torch.randn_like(copy.deepcopy(naive)(image)))
    mine = step_results(stem, image, grad)
    assert in_the_computed_layout(mine["output"]) and in_the_computed_layout(mine["input.grad"])
    assert_results_close(mine, step_results(naive, image, grad), FLOAT64_TOL)


def test_gradcheck_transition_and_stem():
    transition, stem = _fused_stages(2)
    x = channels_last(torch.randn(2, 6, 4, 4, dtype=torch.float64)).requires_grad_()
    params = (transition.norm.weight, transition.norm.bias, transition.conv.weight)
    assert torch.autograd.gradcheck(lambda x, *p: transition(x), (x, *params))
    image = channels_last(torch.randn(2, 2, 9, 8, dtype=torch.float64)).requires_grad_()
    params = (stem.conv0.weight, stem.norm0.weight, stem.norm0.bias)
    assert torch.autograd.gradcheck(lambda image, *p: stem(image), (image, *params))


def _small_models():
    from densenet_efficient import models

    return [
        pytest.param(lambda **k: models.DenseNet(4, (2, 3), 8, **k), (2, 3, 40, 40), id="imagenet-stem"),
        pytest.param(lambda **k: models.densenet_bc(16, 6, **k), (2, 3, 16, 16), id="densenet-bc-16-6"),
        pytest.param(lambda **k: models.DenseNet(4, (2, 2), 8, spatial_dims=3, **k), (2, 3, 16, 16, 16),
                     id="3d"),
        # The last block's maps are one pixel, contiguous and channels last at once.
        pytest.param(lambda **k: models.DenseNet(4, (2, 2), 8, **k), (2, 3, 8, 8), id="one-pixel"),
        pytest.param(lambda **k: models.DenseNet(4, (2, 2), 8, spatial_dims=3, **k), (2, 3, 8, 8, 8),
                     id="3d-one-voxel"),
    ]


@pytest.mark.parametrize("build, shape", _small_models())
def test_a_channels_last_model_computes_channels_last_and_matches_naive(build, shape):
    """A model moved to channels_last, fed a contiguous image as torchvision
    models often are: conv0's weight makes the stem's output channels last,
    and every block and transition after it computes channels last."""
    torch.manual_seed(0)
    ours = build().double()
    reference = copy.deepcopy(ours)
    reference.mode = "naive"
    ours.to(memory_format=FORMATS[len(shape) - 2])
    reference.to(memory_format=FORMATS[len(shape) - 2])
    from densenet_efficient.models import Transition
    from densenet_efficient.modules import DenseBlock

    layouts = []  # hooks on the blocks and transitions, which keep them fused (the stem's parts would not be)
    for module in ours.features.children():
        if isinstance(module, (DenseBlock, Transition)):
            module.register_forward_hook(
                lambda m, args, out: layouts.extend([is_channels_last(args[0]), is_channels_last(out)]))
    x = torch.randn(shape, dtype=torch.float64)
    grad = torch.randn(shape[0], ours.classifier.out_features, dtype=torch.float64)
    mine, expected = step_results(ours, x, grad), step_results(reference, x, grad)
    # Sums over every value of a channel, added up in other orders.
    assert_results_close(mine, expected, 1e-9, zero=1e-12)
    assert layouts and all(layouts), layouts


def _weight_copies(model, x) -> int:
    """How many copies of its k×k convolution weights (k > 1) a training
    step of `model` makes."""
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() > 2 and p.shape[-1] > 1}
    model(x).sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        model(x).sum().backward()
    return sum(e.name == "aten::copy_" and bool(e.input_shapes) and tuple(e.input_shapes[0]) in shapes
               for e in profile.events())


@pytest.mark.parametrize("build, shape", _small_models())
def test_a_channels_last_model_copies_its_weights_no_more_than_naive(build, shape):
    """The convolutions get a channels-last model's weights as they are, and
    weight gradients come back in their layout: the copies left are ATen's
    own, as many as in the naive model (they were seven per layer)."""
    torch.manual_seed(0)
    ours = build().to(memory_format=FORMATS[len(shape) - 2])
    reference = copy.deepcopy(ours)
    reference.mode = "naive"
    x = torch.randn(shape)
    assert _weight_copies(ours, x) <= _weight_copies(reference, x)


def test_under_cpu_autocast_a_channels_last_volume_model_keeps_its_blocks_channels_last():
    """There the transitions run as modules (fused.runs_fused), and ATen's
    avg_pool3d gives a channels_last_3d input a contiguous output: the
    transition lays it out as its input, as the fused one does, so the
    blocks after it compute channels last and take the model's weights as
    they are, as the first block does."""
    from densenet_efficient import models
    from densenet_efficient.models import Transition
    from densenet_efficient.modules import DenseBlock

    torch.manual_seed(0)
    model = models.DenseNet(4, (2, 2, 2), 8, spatial_dims=3).to(memory_format=torch.channels_last_3d)
    layouts = {}
    for name, module in model.features.named_children():
        if isinstance(module, (DenseBlock, Transition)):
            module.register_forward_hook(
                lambda m, args, out, name=name: layouts.update({name: (is_channels_last(args[0]),
                                                                        is_channels_last(out))}))
    x = torch.randn(2, 3, 32, 32, 32)  # blocks at 8³, 4³ and 2³: channels last is not also contiguous
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).sum().backward()
    assert len(layouts) == 5 and all(all(pair) for pair in layouts.values()), layouts


@pytest.mark.parametrize("build, shape", _small_models())
@pytest.mark.parametrize("recompute", [False, True], ids=["efficient", "efficient-recompute"])
def test_whole_model_saved_bytes_equal_nchw_and_the_model(build, shape, recompute):
    from densenet_efficient.memory import model_saved_bytes

    saved = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        model = build(recompute_bottleneck=recompute)
        x = torch.randn(shape)
        if layout == "channels_last":
            model.to(memory_format=FORMATS[len(shape) - 2])
            x = channels_last(x)
        _, saved[layout] = saved_tensor_bytes(model, x, ignore=[*model.parameters(), *model.buffers()])
    assert saved["channels_last"] == saved["contiguous"] == model_saved_bytes(model, shape)


def _torchvision_small():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5)


def _timm_small():
    timm = pytest.importorskip("timm")
    return timm.create_model("densenet121", pretrained=False, growth_rate=8, block_config=(2, 2), num_classes=5)


def _monai_small():
    nets = pytest.importorskip("monai.networks.nets")
    return nets.DenseNet(spatial_dims=2, in_channels=3, out_channels=5, init_features=8, growth_rate=4,
                         block_config=(2, 2))


@pytest.mark.parametrize("build", [_torchvision_small, _timm_small, _monai_small], ids=["torchvision", "timm", "monai"])
def test_converted_models_in_channels_last_match_the_originals(build):
    """torchvision's, timm's and MONAI's DenseNets, converted, then moved to
    channels_last with their input: their blocks compute channels last and
    the model computes what the original (also channels_last) computes."""
    from densenet_efficient import DenseBlock, convert

    torch.manual_seed(0)
    original = build().double()
    randomize_norms(original, torch.Generator().manual_seed(1))
    converted = convert(copy.deepcopy(original))
    layouts = []
    for module in converted.modules():
        if isinstance(module, DenseBlock):
            module.register_forward_hook(lambda m, args, out: layouts.append(is_channels_last(out)))
    for model in (original, converted):
        model.to(memory_format=torch.channels_last)
    x = channels_last(torch.randn(2, 3, 48, 48, dtype=torch.float64))
    grad = torch.randn(2, 5, dtype=torch.float64)
    mine, expected = step_results(converted, x, grad), step_results(original, x, grad)
    assert layouts and all(layouts), layouts
    # Sums over every value of a channel, added up in other orders.
    assert_results_close(mine, expected, 1e-9, zero=1e-12)
