"""Blocks for volumes [N, C, D, H, W] (BatchNorm3d, Conv3d 1×1×1 and 3×3×3)
and sequences [N, C, L] (BatchNorm1d, Conv1d): the same parity, gradcheck,
opcheck, memory and bad-input checks as the 2-D block, against the naive
reference built of the same N-D layers."""

import pytest
import torch
from torch.func import functional_call

import densenet_efficient as de
from conftest import (
    assert_results_close, block_forward_arguments, make_pair, opcheck_block_backward, positional, rel_error,
    requires_cuda, step_results,
)
from densenet_efficient import reference
from densenet_efficient._ops import ops
from densenet_efficient.memory import dense_block_saved_bytes, model_saved_bytes, saved_tensor_bytes

FLOAT64_TOL = 1e-10
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]

# (spatial_dims, batch, spatial sizes, num_input_features, growth_rate, num_layers, bn_size)
SHAPES = [
    pytest.param((3, 2, (3, 4, 5), 5, 3, 3, 4), id="3d"),
    pytest.param((3, 3, (1, 1, 2), 4, 2, 2, 2), id="3d-thin"),
    pytest.param((3, 2, (3, 3, 3), 4, 3, 2, 0), id="3d-plain-layers"),
    # One voxel: the CPU's convolutions are GEMMs of its channel rows.
    pytest.param((3, 3, (1, 1, 1), 5, 3, 3, 4), id="3d-one-voxel"),
    pytest.param((3, 2, (1, 1, 1), 4, 3, 2, 0), id="3d-one-voxel-plain-layers"),
    pytest.param((1, 3, (1,), 5, 3, 2, 4), id="1d-one-pixel"),
    pytest.param((1, 3, (9,), 5, 3, 3, 4), id="1d"),
]


def _pair(shape, **kwargs):
    spatial_dims, _, _, c0, k, num_layers, bn_size = shape
    return make_pair(num_layers, c0, k, bn_size, spatial_dims=spatial_dims, **kwargs)


def _input_and_grad(shape, generator=None, dtype=torch.float64):
    _, batch, spatial, c0, k, num_layers, _ = shape
    x = torch.randn(batch, c0, *spatial, dtype=dtype, generator=generator)
    grad = torch.randn(batch, c0 + num_layers * k, *spatial, dtype=dtype, generator=generator)
    return x, grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-bottleneck", "recompute"])
def test_one_step_matches_reference_float64(shape, training, drop_rate, recompute):
    ours, expected = _pair(shape, drop_rate=drop_rate, recompute_bottleneck=recompute)
    ours.train(training)
    expected.train(training)
    x, grad = _input_and_grad(shape)
    assert_results_close(step_results(ours, x, grad), step_results(expected, x, grad), FLOAT64_TOL)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_three_sgd_steps_match_reference_float64(momentum):
    shape = (3, 2, (3, 4, 4), 6, 3, 3, 4)
    ours, expected = _pair(shape, momentum=momentum)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, expected)]
    generator = torch.Generator().manual_seed(7)
    for step in range(3):
        x, grad = _input_and_grad(shape, generator)
        results = [step_results(m, x, grad, seed=step) for m in (ours, expected)]
        for optimizer in optimizers:
            optimizer.step()
        assert_results_close(*results, FLOAT64_TOL)
    for (name, p), q in zip(ours.named_parameters(), expected.parameters()):
        assert rel_error(p, q) <= FLOAT64_TOL, name
    assert ours.denselayer3.norm2.num_batches_tracked.item() == 3


@pytest.mark.parametrize("mode", de.MODES)
def test_every_mode_matches_reference(mode):
    shape = (3, 2, (3, 4, 5), 4, 2, 3, 4)
    ours, expected = _pair(shape, mode=mode)
    x, grad = _input_and_grad(shape)
    mine, theirs = step_results(ours, x, grad), step_results(expected, x, grad)
    if mode == "checkpoint":  # norm1 statistics are updated twice there
        mine = {k: v for k, v in mine.items() if ".norm1.running" not in k and ".norm1.num" not in k}
        theirs = {k: v for k, v in theirs.items() if k in mine}
    assert_results_close(mine, theirs, FLOAT64_TOL)


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda x: x.contiguous(memory_format=torch.channels_last_3d), id="channels_last_3d"),
        pytest.param(lambda x: x.transpose(2, 4).contiguous().transpose(2, 4), id="transposed-DW"),
        pytest.param(lambda x: torch.stack([x, torch.zeros_like(x)], 2)[:, :, 0], id="channel-strided"),
    ],
)
def test_volume_layouts_give_the_same_result(make_input):
    shape = (3, 2, (3, 4, 5), 5, 2, 3, 4)
    base, grad = _input_and_grad(shape)
    unusual = make_input(base)
    assert torch.equal(unusual, base) and unusual.stride() != base.stride()
    expected = step_results(_pair(shape)[0], base, grad)
    assert_results_close(step_results(_pair(shape)[0], unusual, grad), expected, FLOAT64_TOL)


def test_float32_volume_error_within_twice_pytorchs_own():
    shape = (3, 4, (4, 6, 6), 8, 4, 4, 4)
    ours32, naive32 = (m.float() for m in _pair(shape))
    exact = _pair(shape)[1]
    x, grad = _input_and_grad(shape, torch.Generator().manual_seed(3))

    def errors(model):
        results, truth = step_results(model, x.float(), grad.float()), step_results(exact, x, grad)
        return {n: rel_error(v, truth[n]) for n, v in truth.items() if not n.endswith("num_batches_tracked")}

    ours, naive = errors(ours32), errors(naive32)
    for name, err in ours.items():
        assert err <= 2 * naive[name] + 1e-6, f"{name}: {err:.3g} vs naive {naive[name]:.3g}"


def test_volume_autocast_bfloat16_within_twice_naive():
    """CPU autocast (bfloat16): convolutions in bfloat16, BatchNorm in float32."""
    shape = (3, 4, (4, 8, 8), 16, 8, 3, 4)  # 1024 values per channel: few ReLU gates flip
    ours, naive = (m.float() for m in _pair(shape))
    exact = _pair(shape)[1]
    x, grad = _input_and_grad(shape, torch.Generator().manual_seed(5))

    def run(model, dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            return step_results(model, x.to(dtype or torch.float64), grad.to(dtype or torch.float64))

    truth = run(exact, None)
    mine, theirs = run(ours, torch.bfloat16), run(naive, torch.bfloat16)
    assert mine["output"].dtype == torch.bfloat16 and ours.denselayer1.norm1.running_mean.dtype == torch.float32
    for name in ("output", "input.grad", "denselayer1.conv1.weight.grad", "denselayer2.norm1.weight.grad",
                 "denselayer3.norm2.running_var"):
        err, naive_err = rel_error(mine[name], truth[name]), rel_error(theirs[name], truth[name])
        assert err <= 2 * naive_err + 2e-3, f"{name}: {err:.3g} vs naive {naive_err:.3g}"


@pytest.mark.parametrize("spatial_dims, spatial", [(3, (2, 3, 2)), (1, (5,))], ids=["3d", "1d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-bottleneck", "recompute"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.4], ids=["no-dropout", "dropout"])
def test_gradcheck(spatial_dims, spatial, training, recompute, drop_rate):
    block, _ = make_pair(2, 3, 2, bn_size=2, drop_rate=drop_rate, recompute_bottleneck=recompute,
                         spatial_dims=spatial_dims)
    block.train(training)
    names = [name for name, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())
    x = torch.randn(2, 3, *spatial, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        torch.manual_seed(0)  # the same dropout mask at every evaluation
        return functional_call(block, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


# --- the per-channel operators on 3-D and 5-D tensors ------------------------


def _channel_slice(spatial, channels=5, batch=3, device="cpu"):
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(batch, channels + 4, *spatial, generator=g, dtype=torch.float64) * 2 + 0.5
    return wide.to(device)[:, 2 : 2 + channels]


def _vectors(x):
    g = torch.Generator().manual_seed(1)
    channels = x.shape[1]
    weight = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5).to(x.device)
    bias = (torch.randn(channels, generator=g, dtype=torch.float64) * 0.3).to(x.device)
    return (*reference.channel_stats(x), weight, bias)


SPATIAL = [pytest.param((3, 4, 5), id="5d"), pytest.param((7,), id="3d")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial", SPATIAL)
def test_per_channel_ops_float64(device, spatial):
    x = _channel_slice(spatial, device=device)
    mean, var, weight, bias = _vectors(x)
    ours_mean, ours_var = ops.channel_stats(x)
    assert rel_error(ours_mean, mean) <= 1e-13 and rel_error(ours_var, var) <= 1e-13
    assert rel_error(ops.bn_relu(x, mean, var, weight, bias, 1e-5),
                     reference.bn_relu(x, mean, var, weight, bias, 1e-5)) <= 1e-13
    # Backward with batch statistics equals autograd through F.batch_norm + relu.
    leaf = x.detach().clone().requires_grad_()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    out = torch.relu(torch.nn.functional.batch_norm(leaf, None, None, w, b, training=True, eps=1e-5))
    grad = torch.randn_like(out)
    out.backward(grad)
    grad_input, grad_weight, grad_bias = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 1e-5, True)
    for ours, theirs in ((grad_input, leaf.grad), (grad_weight, w.grad), (grad_bias, b.grad)):
        assert rel_error(ours, theirs) <= 1e-12
    buffer = torch.zeros(3, 9, *spatial, dtype=torch.float64, device=device)
    stats = torch.zeros(2, 5, dtype=torch.float64, device=device)
    ops.copy_with_stats(x, buffer[:, 1:6], stats[0], stats[1])
    assert torch.equal(buffer[:, 1:6], x) and torch.equal(stats[0], ours_mean)


@pytest.mark.parametrize("spatial", SPATIAL)
def test_opcheck_per_channel_ops(spatial):
    x = _channel_slice(spatial, channels=3, batch=2).contiguous()
    mean, var, weight, bias = _vectors(x)
    torch.library.opcheck(ops.channel_stats.default, (x.clone().requires_grad_(),))
    stats = torch.zeros(2, 6, dtype=torch.float64)
    torch.library.opcheck(ops.channel_stats_out.default, (x, stats[0, 1:4], stats[1, 1:4]))
    buffer = torch.zeros(2, 7, *spatial, dtype=torch.float64)
    torch.library.opcheck(ops.copy_with_stats.default, (x, buffer[:, 2:5], stats[0, :3], stats[1, :3]))
    grad_args = [t.clone().requires_grad_() for t in (x, mean, var, weight, bias)]
    torch.library.opcheck(ops.bn_relu.default, (*grad_args, 1e-5))
    torch.library.opcheck(ops.bn_relu_out.default, (x, mean, var, weight, bias, 1e-5, torch.empty_like(x)))
    grad = torch.randn_like(x)
    torch.library.opcheck(ops.bn_relu_backward.default, (grad, x, mean, var, weight, bias, 1e-5, True))
    torch.library.opcheck(
        ops.bn_relu_backward_accumulate.default, (grad, x, mean, var, weight, bias, 1e-5, False, torch.randn_like(x))
    )


def test_partly_overlapping_volume_slices_are_refused():
    buffer = torch.randn(2, 8, 2, 3, 3, dtype=torch.float64)
    x = buffer[:, 0:4]
    mean, var, weight, bias = _vectors(x.contiguous())
    before = buffer.clone()
    with pytest.raises(RuntimeError, match="partly overlaps a tensor the operator reads"):
        ops.bn_relu_out(x, mean, var, weight, bias, 1e-5, buffer[:, 2:6])
    assert torch.equal(buffer, before)


def _block_args(training, spatial_dims=3):
    block, _ = make_pair(2, 3, 2, bn_size=2, spatial_dims=spatial_dims)
    block.train(training)
    x = torch.randn(2, 3, *((2, 3, 3) if spatial_dims == 3 else (5,)), dtype=torch.float64, requires_grad=True)
    return block_forward_arguments(block, x)


@pytest.mark.parametrize("spatial_dims", [3, 1], ids=["3d", "1d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_block_ops(spatial_dims, training):
    args = _block_args(training, spatial_dims)
    torch.library.opcheck(ops.dense_block_forward.default, positional(ops.dense_block_forward.default, args))
    opcheck_block_backward(args)


def test_block_op_refuses_weights_of_another_rank():
    args = _block_args(True)
    flat = [w[..., 0] for w in args["conv1_weight"]]
    with pytest.raises(ValueError, match=r"conv weights should be 5-D for a 5-D input, got layer 1's conv1 of shape \[4, 3, 1, 1\]"):
        ops.dense_block_forward(**dict(args, conv1_weight=flat))
    flat = [args["conv1_weight"][0], args["conv1_weight"][1][..., 0]]
    with pytest.raises(ValueError, match=r"layer 2 conv1.weight should have shape \[4, 5, 1, 1, 1\], got \[4, 5, 1, 1\]"):
        ops.dense_block_forward(**dict(args, conv1_weight=flat))
    flat = [w[..., 0] for w in args["conv2_weight"]]
    with pytest.raises(ValueError, match=r"conv weights should be 5-D \(the rank of the block's tensors, \[2, 3, 2, 3, 3\]\), got conv1 \[4, 3, 1, 1, 1\] and conv2 \[2, 4, 3, 3\]"):
        ops.dense_block_forward(**dict(args, conv2_weight=flat))
    with pytest.raises(ValueError, match=r"conv weights should be 5-D for a 5-D input, got layer 1's conv1 of shape \[4\]"):
        ops.dense_block_forward(**dict(args, conv1_weight=[torch.zeros(4, dtype=torch.float64)] * 2))
    with pytest.raises(ValueError, match=r"expected a 3-D, 4-D or 5-D input .*got a 6-D tensor"):
        ops.dense_block_forward(**dict(args, input=args["input"][..., None]))
    wrong = [args["conv2_weight"][0], torch.randn(2, 4, 3, 3, 1, dtype=torch.float64)]
    with pytest.raises(ValueError, match=r"layer 2 conv2.weight should have shape \[2, 4, 3, 3, 3\], got \[2, 4, 3, 3, 1\]"):
        ops.dense_block_forward(**dict(args, conv2_weight=wrong))


# --- memory -------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"recompute_bottleneck": True}, {"drop_rate": 0.2}, {"bn_size": 0}],
                         ids=["keep-bottleneck", "recompute", "dropout", "plain"])
def test_volume_block_saved_bytes_equal_the_model(options):
    bn_size = options.pop("bn_size", 4)
    block, _ = make_pair(5, 8, 4, bn_size=bn_size, dtype=torch.float32, spatial_dims=3, **options)
    x = torch.randn(2, 8, 4, 5, 6, requires_grad=True)
    _, measured = saved_tensor_bytes(block, x, ignore=[*block.parameters(), *block.buffers()])
    assert measured == dense_block_saved_bytes(tuple(x.shape), 5, 4, bn_size=bn_size, **options)


@pytest.mark.parametrize("mode, recompute", [("naive", False), ("checkpoint", False), ("efficient", False),
                                             ("efficient", True)],
                         ids=["naive", "checkpoint", "efficient", "efficient-recompute"])
@pytest.mark.parametrize("spatial_dims, size", [(3, 24), (1, 64)], ids=["3d", "1d"])
def test_whole_volume_model_saved_bytes_equal_the_model(mode, recompute, spatial_dims, size):
    from densenet_efficient import models

    torch.manual_seed(0)
    model = models.DenseNet(4, (2, 3), 8, num_classes=3, mode=mode, recompute_bottleneck=recompute,
                            spatial_dims=spatial_dims, in_channels=1)
    x = torch.randn(2, 1, *[size] * spatial_dims)
    _, measured = saved_tensor_bytes(model, x, ignore=[*model.parameters(), *model.buffers()])
    assert measured == model_saved_bytes(model, tuple(x.shape))
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("spatial_dims, spatial", [(3, (3, 2, 2)), (3, (2, 4, 3)), (1, (6,))],
                         ids=["3d-depth-equals-channels", "3d", "1d"])
def test_synchronised_block_on_one_rank_equals_the_plain_block(one_rank_world, spatial_dims, spatial):
    """Synchronised BatchNorm takes another path through backward (the
    gradient sums, all-reduced, then the input gradient from them); on one
    rank it must give what the plain block gives, for every spatial rank."""
    plain, _ = make_pair(3, 3, 2, bn_size=2, spatial_dims=spatial_dims)
    synced, _ = make_pair(3, 3, 2, bn_size=2, spatial_dims=spatial_dims)
    synced.sync_group = torch.distributed.group.WORLD.group_name
    x = torch.randn(2, 3, *spatial, dtype=torch.float64)
    grad = torch.randn(2, 9, *spatial, dtype=torch.float64)
    assert_results_close(step_results(synced, x, grad), step_results(plain, x, grad), FLOAT64_TOL)


def test_float32_statistics_and_gradient_sums_of_a_large_volume():
    """A 128³ plane per channel: sums kept in float alone lose the variance;
    ours stay within twice PyTorch's own error against float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 128, 128, 128, generator=generator) * 0.1 + 1  # offset: cancellation
    grad = torch.randn(x.shape, generator=generator)
    weight, bias = torch.tensor([1.5, 0.7]), torch.tensor([0.1, -0.2])
    dims = (0, 2, 3, 4)
    mean, var = ops.channel_stats(x)
    exact_mean, exact_var = reference.channel_stats(x.double())
    torch_var, torch_mean = torch.var_mean(x, dim=dims, unbiased=False)
    assert rel_error(mean, exact_mean) <= 2 * rel_error(torch_mean, exact_mean) + 1e-7
    assert rel_error(var, exact_var) <= 2 * rel_error(torch_var, exact_var) + 1e-7

    def torch_grads(dtype):
        w, b = weight.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()
        leaf = x.to(dtype).requires_grad_()
        torch.relu(torch.nn.functional.batch_norm(leaf, None, None, w, b, training=True)).backward(grad.to(dtype))
        return leaf.grad, w.grad, b.grad

    exact, theirs = torch_grads(torch.float64), torch_grads(torch.float32)
    ours = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 1e-5, True)
    for name, mine, their, truth in zip(("input", "weight", "bias"), ours, theirs, exact):
        assert rel_error(mine, truth) <= 2 * rel_error(their, truth) + 1e-6, name
