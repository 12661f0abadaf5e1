"""Each custom operator against its pure-PyTorch reference (float64 tight;
float32/bfloat16/half within 2x of PyTorch's own error vs float64), gradcheck
of the differentiable ones, and torch.library.opcheck of every one."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, block_forward_arguments, make_pair, opcheck_block_backward, positional, rel_error
from densenet_efficient import reference
from densenet_efficient._ops import argument_names, math_dtype, ops, result_names

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def channel_slice(batch=3, channels=5, height=4, width=6, dtype=torch.float64, device="cpu", seed=0):
    """Channels 2..2+channels of a wider buffer: the strided layout the block
    hands the kernels."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, channels + 4, height, width, generator=g, dtype=torch.float64) * 2 + 0.5
    return wide.to(dtype=dtype, device=device)[:, 2 : 2 + channels]


def bn_vectors(channels, dtype=torch.float64, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=g, dtype=torch.float64) * 0.3
    return weight.to(dtype=dtype, device=device), bias.to(dtype=dtype, device=device)


def stats_of(x):
    return reference.channel_stats(x)


# --- parity -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_channel_stats_float64(device):
    x = channel_slice(device=device)
    mean, var = ops.channel_stats(x)
    ref_mean, ref_var = reference.channel_stats(x)
    assert mean.dtype == var.dtype == torch.float64
    assert rel_error(mean, ref_mean) <= 1e-13 and rel_error(var, ref_var) <= 1e-13


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_channel_stats_low_precision(device, dtype):
    x64 = channel_slice(batch=8, channels=7, height=9, width=9, device=device) + 3.0  # offset: cancellation test
    x = x64.to(dtype)
    mean, var = ops.channel_stats(x)
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Same quantised input in float64: what exact arithmetic would give.
    exact_mean, exact_var = reference.channel_stats(x.double())
    # PyTorch's own batch statistics on this input.
    torch_var, torch_mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
    for ours, theirs, exact in ((mean, torch_mean, exact_mean), (var, torch_var, exact_var)):
        assert rel_error(ours, exact) <= 2 * rel_error(theirs, exact) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, *LOW_PRECISION])
def test_copy_with_stats_copies_exactly_and_matches_channel_stats(device, dtype):
    source = channel_slice(batch=4, channels=5, height=7, width=7, dtype=dtype, device=device)
    buffer = torch.full((4, 9, 7, 7), float("nan"), dtype=dtype, device=device)
    stats = torch.full((2, 8), float("nan"), dtype=math_dtype(dtype), device=device)
    ops.copy_with_stats(source, buffer[:, 3:8], stats[0, 1:6], stats[1, 1:6])
    assert torch.equal(buffer[:, 3:8], source)
    assert buffer[:, :3].isnan().all() and buffer[:, 8:].isnan().all()
    mean, var = ops.channel_stats(source)
    assert torch.equal(stats[0, 1:6], mean) and torch.equal(stats[1, 1:6], var)
    assert stats[:, 0].isnan().all() and stats[:, 6:].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_destinations_of_another_dtype_or_layout(device):
    """Destinations the kernels cannot write directly (float64 for float32
    input, a strided view; a channels-last copy target) still get the values."""
    x = channel_slice(dtype=torch.float32, device=device)
    mean, var = ops.channel_stats(x)
    wide = torch.zeros(2, 10, dtype=torch.float64, device=device)
    ops.channel_stats_out(x, wide[0, ::2], wide[1, ::2])
    assert torch.equal(wide[0, ::2], mean.double()) and torch.equal(wide[1, ::2], var.double())
    destination = torch.empty(3, 5, 4, 6, device=device).to(memory_format=torch.channels_last)
    ops.copy_with_stats(x, destination, wide[0, :5], wide[1, :5])
    # A channels-last destination is walked by rows: the same sums in another order.
    assert torch.equal(destination, x) and rel_error(wide[1, :5], var.double()) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_of_an_empty_batch_are_nan(device):
    empty = torch.empty(0, 3, 4, 4, device=device)
    mean, var = torch.zeros(3, device=device), torch.zeros(3, device=device)
    ops.copy_with_stats(empty, torch.empty_like(empty), mean, var)
    assert mean.isnan().all() and var.isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momenta", [(0.1, 0.3), (None, None)], ids=["momentum", "cumulative"])
def test_update_running_stats_matches_batch_norm(device, momenta):
    """Two norms reading their statistics at offsets of one flat vector get
    exactly nn.BatchNorm2d's update (momentum=None: the cumulative average,
    1/num_batches_tracked read on the device)."""
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(3, n, 4, 4, generator=g, dtype=torch.float64).to(device) for n in (4, 3)]
    norms = [torch.nn.BatchNorm2d(x.shape[1], momentum=m).double().to(device) for x, m in zip(inputs, momenta)]
    for norm in norms:
        with torch.no_grad():
            norm.running_mean.uniform_(-1, 1, generator=None)
            norm.num_batches_tracked.fill_(2)
    ours = [copy.deepcopy(n) for n in norms]
    flat_mean = torch.zeros(9, dtype=torch.float64, device=device)
    flat_var = torch.zeros(9, dtype=torch.float64, device=device)
    for x, offset in zip(inputs, (0, 5)):
        ops.channel_stats_out(x, flat_mean[offset : offset + x.shape[1]], flat_var[offset : offset + x.shape[1]])
    ops.update_running_stats(
        [n.running_mean for n in ours], [n.running_var for n in ours], [n.num_batches_tracked for n in ours],
        list(momenta), [0, 5], flat_mean, flat_var, torch.tensor(3 * 16, device=device),
    )
    for norm, x in zip(norms, inputs):
        norm(x)  # training mode: nn.BatchNorm2d's own update
    for mine, theirs in zip(ours, norms):
        assert torch.equal(mine.num_batches_tracked, theirs.num_batches_tracked)
        assert rel_error(mine.running_mean, theirs.running_mean) <= 1e-14
        assert rel_error(mine.running_var, theirs.running_var) <= 1e-14


@pytest.mark.parametrize("count", [0, 1])
def test_update_running_stats_of_fewer_than_two_values_only_counts_the_batch(count):
    running_mean, running_var, tracked, momenta, offsets, mean, var, _ = _running_stats_args([0.1, None])
    before = [t.clone() for t in running_mean + running_var]
    ops.update_running_stats(
        running_mean, running_var, tracked, momenta, offsets, mean * float("nan"), var, torch.tensor(count)
    )
    assert [int(t) for t in tracked] == [4, 1]
    assert all(torch.equal(a, b) for a, b in zip(before, running_mean + running_var))


def test_update_running_stats_reads_counts_on_the_device_without_synchronising():
    """momentum=None needs num_batches_tracked and the unbiased variance the
    count: both are read by the kernel, never by the host (no .item())."""
    args = _running_stats_args([None, None])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        ops.update_running_stats(*args)
    names = {e.name for e in profile.events()}
    assert "aten::_local_scalar_dense" not in names and "aten::item" not in names, names


@pytest.mark.parametrize("device", DEVICES)
def test_destinations_that_overlap_are_refused_before_anything_is_written(device):
    x, mean, var, weight, bias = (t.to(device) for t in _bn_args(False))
    # A stride-0 destination (every sample the same memory).
    shared = torch.zeros(1, 3, 3, 2, dtype=torch.float64, device=device).expand(2, 3, 3, 2)
    with pytest.raises(RuntimeError, match=r"elements that share memory"):
        ops.bn_relu_out(x, mean, var, weight, bias, 1e-5, shared)
    # Planes that overlap each other (channel stride shorter than a plane).
    storage = torch.zeros(64, dtype=torch.float64, device=device)
    overlapping = storage.as_strided((2, 3, 3, 2), (18, 4, 2, 1))
    with pytest.raises(RuntimeError, match=r"elements that share memory"):
        ops.bn_relu_backward_accumulate(x, x, mean, var, weight, bias, 1e-5, True, overlapping)
    # A destination partly overlapping what the operator reads.
    buffer = torch.randn(1, 8, 3, 2, dtype=torch.float64, device=device)
    before = buffer.clone()
    with pytest.raises(RuntimeError, match=r"partly overlaps a tensor the operator reads"):
        ops.bn_relu_out(buffer[:, :3], mean, var, weight, bias, 1e-5, buffer[:, 2:5])
    with pytest.raises(RuntimeError, match=r"partly overlaps a tensor the operator reads"):
        ops.copy_with_stats(buffer[:, :3], buffer[:, 1:4], mean.clone(), var.clone())
    with pytest.raises(RuntimeError, match=r"mean and var must not overlap"):
        ops.channel_stats_out(x, mean, mean)
    assert torch.equal(buffer, before) and storage.eq(0).all() and shared.eq(0).all()
    # Channel slices of a batch (strided views ATen cannot compare): exactly.
    batch = torch.randn(2, 8, 3, 2, dtype=torch.float64, device=device)
    before = batch.clone()
    with pytest.raises(RuntimeError, match=r"partly overlaps a tensor the operator reads"):
        ops.bn_relu_out(batch[:, :3], mean, var, weight, bias, 1e-5, batch[:, 2:5])
    with pytest.raises(RuntimeError, match=r"partly overlaps a tensor the operator reads"):
        ops.bn_relu_backward_accumulate(x, batch[:, 1:4], mean, var, weight, bias, 1e-5, True, batch[:, 3:6])
    assert torch.equal(batch, before)
    ops.bn_relu_out(batch[:, :3], mean, var, weight, bias, 1e-5, batch[:, 4:7])  # disjoint: fine
    interleaved = torch.randn(2, 6, 3, 2, dtype=torch.float64, device=device)
    ops.bn_relu_out(interleaved[:, 0::2], mean, var, weight, bias, 1e-5, interleaved[:, 1::2])
    assert rel_error(interleaved[:, 1::2], reference.bn_relu(interleaved[:, 0::2], mean, var, weight, bias, 1e-5)) <= 1e-13
    # In place (full overlap) stays allowed, as for ATen's elementwise ops.
    expected = reference.bn_relu(buffer[:, :3], mean, var, weight, bias, 1e-5)
    ops.bn_relu_out(buffer[:, :3], mean, var, weight, bias, 1e-5, buffer[:, :3])
    assert rel_error(buffer[:, :3], expected) <= 1e-13


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relu_gate_follows_the_stored_output_as_pytorch_does(device, dtype):
    """Where y = bn(x) is positive but so small that half/bfloat16 stores it as
    0, relu's stored output is 0 and PyTorch passes no gradient; so do we."""
    x = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float64).repeat(2, 1).view(2, 1, 2, 2).to(dtype).to(device)
    mean, var = torch.zeros(1, device=device), torch.ones(1, device=device)
    weight, bias = torch.ones(1, device=device), torch.full((1,), 1e-44, device=device)  # y = x + 1e-44
    grad = torch.ones(2, 1, 2, 2, dtype=dtype, device=device)
    ours = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 0.0, False)[0]
    y = (x.float() * weight + bias).detach().requires_grad_()  # what batch_norm computes, then stores
    torch.relu(y.to(dtype)).backward(grad)
    assert y.grad[0, 0, 0, 0] == 0  # the pinned case: y > 0, stored as 0, no gradient
    assert torch.equal(ours, y.grad.to(dtype))


# Values of y at the edges of half's and bfloat16's rounding: the largest
# that rounds to zero (half the smallest subnormal, a tie to even) and the
# next float up, half's largest finite value and the next that overflows,
# NaN and the infinities.
EDGES = [2.0**-25, math.nextafter(2.0**-25, 1), 2.0**-134, math.nextafter(2.0**-134, 1), 65504.0, 65520.0, -0.0,
         float("nan"), float("inf"), -float("inf"), 1 / 3, -1 / 3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relu_gate_at_the_rounding_edges(device, dtype):
    """y = bn(x) = bias here, one edge value per channel: the gradient passes
    exactly where PyTorch's relu of the stored output passes it."""
    channels = len(EDGES)
    x = torch.zeros(2, channels, 1, 2, dtype=dtype, device=device)
    mean, var, weight = (torch.full((channels,), v, device=device) for v in (0.0, 1.0, 1.0))
    bias = torch.tensor(EDGES, dtype=torch.float32, device=device)
    grad = torch.ones_like(x)
    ours = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 0.0, False)[0]
    y = (x.float() + bias.view(1, -1, 1, 1)).requires_grad_()
    torch.relu(y.to(dtype)).backward(grad)
    assert torch.equal(ours, y.grad.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_results_round_as_pytorch_rounds(device, dtype):
    """Our stores of half and bfloat16 (their bits, converted by c10's
    functions) equal PyTorch's casts bit for bit, the edges included, for the
    same float y = x·scale + shift."""
    channels = len(EDGES)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, channels, 5, 7, generator=g) * 3).to(dtype).to(device)
    mean, var = torch.zeros(channels, device=device), torch.rand(channels, generator=g).to(device) + 0.5
    weight = torch.rand(channels, generator=g).to(device) + 0.5
    bias = torch.tensor(EDGES, device=device)
    scale = weight * (1 / torch.sqrt(var + 1e-5))
    shift = bias - mean * scale
    y = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    def same_bits(a, b):  # NaN where the other is NaN (payloads differ between ATen's conversions)
        nan = a.isnan()
        return torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])

    assert same_bits(ops.bn_relu(x, mean, var, weight, bias, 1e-5), torch.relu(y).to(dtype))
    copy, stats = torch.empty_like(x), torch.empty(2, channels, device=device)
    ops.copy_with_stats(x, copy, stats[0], stats[1])
    assert same_bits(copy, x)
    total = torch.zeros_like(x)
    grad = torch.randn(x.shape, generator=g).to(dtype).to(device)
    ours = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 1e-5, False)[0]
    ops.bn_relu_backward_accumulate(grad, x, mean, var, weight, bias, 1e-5, False, total)
    # Fixed statistics: dx = γ·r·g in float, stored, where relu's stored
    # output is not <= 0 (NaN passes, as in threshold_backward).
    passes = ~(torch.relu(y).to(dtype).float() <= 0)
    expected = (scale.view(1, -1, 1, 1) * grad.float()).where(passes, 0.0).to(dtype)
    assert same_bits(ours, expected) and same_bits(total, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_float64(device):
    x = channel_slice(device=device)
    weight, bias = bn_vectors(5, device=device)
    mean, var = stats_of(x)
    out = ops.bn_relu(x, mean, var, weight, bias, 1e-5)
    expected = torch.relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5))
    assert rel_error(out, expected) <= 1e-13
    assert rel_error(out, reference.bn_relu(x, mean, var, weight, bias, 1e-5)) <= 1e-13
    assert out.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_bn_relu_low_precision(device, dtype):
    x64 = channel_slice(device=device)
    weight, bias = bn_vectors(5, dtype=torch.float32, device=device)
    mean, var = (v.float() for v in stats_of(x64))
    x = x64.to(dtype)
    exact = reference.bn_relu(x.double(), mean.double(), var.double(), weight.double(), bias.double(), 1e-5)
    ours = ops.bn_relu(x, mean, var, weight, bias, 1e-5)
    theirs = torch.relu(F.batch_norm(x.float(), mean, var, weight, bias, eps=1e-5)).to(dtype)
    assert ours.dtype == dtype
    assert rel_error(ours, exact) <= 2 * rel_error(theirs, exact) + 1e-7


@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_out_writes_into_a_strided_destination(device):
    x = channel_slice(device=device)
    weight, bias = bn_vectors(5, device=device)
    mean, var = stats_of(x)
    buffer = torch.full((3, 9, 4, 6), float("nan"), dtype=torch.float64, device=device)
    out = buffer[:, 1:6]
    ops.bn_relu_out(x, mean, var, weight, bias, 1e-5, out)
    assert rel_error(out, reference.bn_relu(x, mean, var, weight, bias, 1e-5)) <= 1e-13
    assert buffer[:, :1].isnan().all() and buffer[:, 6:].isnan().all()


def _batch_norm_relu_grads(x, weight, bias, grad, eps, batch_stats, mean=None, var=None):
    """PyTorch's own gradients of relu(batch_norm(x))."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    if batch_stats:
        y = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    else:
        y = reference.bn_relu(x, mean, var, weight, bias, eps)
    torch.relu(y).backward(grad)
    return x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "fixed-stats"])
def test_bn_relu_backward_float64(device, batch_stats):
    x = channel_slice(device=device)
    weight, bias = bn_vectors(5, device=device)
    mean, var = stats_of(x)
    grad = torch.randn(x.shape, dtype=torch.float64, device=device)
    expected = _batch_norm_relu_grads(x, weight, bias, grad, 1e-3, batch_stats, mean, var)
    ours = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 1e-3, batch_stats)
    for name, a, b in zip(("input", "weight", "bias"), ours, expected):
        assert rel_error(a, b) <= 1e-12, name

    buffer = torch.randn(3, 9, 4, 6, dtype=torch.float64, device=device)
    before = buffer.clone()
    grad_weight, grad_bias = ops.bn_relu_backward_accumulate(
        grad, x, mean, var, weight, bias, 1e-3, batch_stats, buffer[:, 2:7]
    )
    assert rel_error(buffer[:, 2:7], before[:, 2:7] + expected[0]) <= 1e-12
    assert torch.equal(buffer[:, :2], before[:, :2]) and torch.equal(buffer[:, 7:], before[:, 7:])
    assert rel_error(grad_weight, expected[1]) <= 1e-12 and rel_error(grad_bias, expected[2]) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_bn_relu_backward_low_precision(device, dtype):
    x64 = channel_slice(batch=4, device=device)
    weight, bias = bn_vectors(5, dtype=torch.float32, device=device)
    grad64 = torch.randn(x64.shape, dtype=torch.float64, device=device)
    x, grad = x64.to(dtype), grad64.to(dtype)
    mean, var = (v.float() for v in stats_of(x.double()))  # batch statistics of this very input
    exact = _batch_norm_relu_grads(x.double(), weight.double(), bias.double(), grad.double(), 1e-5, True)
    ours = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 1e-5, True)
    theirs = _batch_norm_relu_grads(x.float(), weight, bias, grad.float(), 1e-5, True)
    theirs = (theirs[0].to(dtype), theirs[1], theirs[2])
    for name, a, b, e in zip(("input", "weight", "bias"), ours, theirs, exact):
        assert rel_error(a, e) <= 2 * rel_error(b, e) + 1e-6, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
def test_backward_in_two_passes_over_a_batch_split_across_ranks(device, accumulate):
    """Synchronised BatchNorm's backward: each rank sums dγ and dβ over its
    part of the batch, the sums are added (the all-reduce), and each rank's
    input gradient follows from the global sums and count. Over a batch split
    in two it equals the backward of the whole batch."""
    x = channel_slice(batch=6, device=device)
    weight, bias = bn_vectors(5, device=device)
    mean, var = stats_of(x)  # the global batch's
    grad = torch.randn(x.shape, dtype=torch.float64, device=device)
    expected = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 1e-3, True)
    parts = (slice(0, 2), slice(2, 6))
    sums = [ops.bn_relu_backward_sums(grad[p], x[p], mean, var, weight, bias, 1e-3) for p in parts]
    grad_weight, grad_bias = (sum(s[i] for s in sums) for i in (0, 1))
    assert rel_error(grad_weight, expected[1]) <= 1e-12 and rel_error(grad_bias, expected[2]) <= 1e-12
    count = torch.tensor(x.numel() // x.shape[1], device=device)
    buffer = torch.randn(6, 9, 4, 6, dtype=torch.float64, device=device)
    before = buffer.clone()
    for p in parts:
        ops.bn_relu_backward_input(grad[p], x[p], mean, var, weight, bias, 1e-3, grad_weight, grad_bias, count,
                                   accumulate, buffer[p, 2:7])
    assert rel_error(buffer[:, 2:7], expected[0] + (before[:, 2:7] if accumulate else 0)) <= 1e-12
    assert torch.equal(buffer[:, :2], before[:, :2]) and torch.equal(buffer[:, 7:], before[:, 7:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_sums_stay_in_float_for_half_parameters(device, dtype):
    """What synchronised BatchNorm all-reduces is not rounded to the
    parameters' dtype first (PyTorch's SyncBatchNorm keeps float sums too)."""
    x64 = channel_slice(batch=4, device=device)
    weight, bias = (v.to(dtype) for v in bn_vectors(5, device=device))
    x, grad = x64.to(dtype), torch.randn(x64.shape, dtype=torch.float64, device=device).to(dtype)
    mean, var = (v.float() for v in stats_of(x.double()))
    sums = ops.bn_relu_backward_sums(grad, x, mean, var, weight, bias, 1e-5)
    whole = ops.bn_relu_backward(grad, x, mean, var, weight.float(), bias.float(), 1e-5, True)
    assert all(s.dtype == torch.float32 for s in sums)
    assert torch.equal(sums[0], whole[1]) and torch.equal(sums[1], whole[2])
    out = torch.empty_like(x)
    count = torch.tensor(x.numel() // x.shape[1], device=device)
    ops.bn_relu_backward_input(grad, x, mean, var, weight, bias, 1e-5, *sums, count, False, out)
    assert rel_error(out, whole[0]) <= {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


# --- channel rows (channels_last tensors and channel slices of them) --------


def channels_last_buffer(batch, channels, spatial, dtype=torch.float64, device="cpu", seed=0, offset=0):
    """[N, channels, *spatial] in the channels-last order, whatever the rank
    (1-D included), starting `offset` elements into its storage."""
    g = torch.Generator().manual_seed(seed)
    count = batch * channels * math.prod(spatial)
    flat = (torch.randn(count + offset, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype=dtype, device=device)
    rows = flat[offset:].view(batch, *spatial, channels)
    return rows.permute(0, rows.dim() - 1, *range(1, rows.dim() - 1))


ROW_LAYOUTS = {  # (spatial, offset): channels 2..2+C of a wider channels-last buffer
    "2d": ((4, 6), 0), "2d-misaligned": ((5, 3), 1), "3d": ((3, 2, 4), 0), "1d": ((7,), 0), "1x1": ((1, 1), 0),
}


def row_slice(layout, channels=5, batch=3, dtype=torch.float64, device="cpu", seed=0):
    spatial, offset = ROW_LAYOUTS[layout]
    return channels_last_buffer(batch, channels + 4, spatial, dtype, device, seed, offset)[:, 2 : 2 + channels]


def nan_row_slice(like, channels=5):
    """A NaN channels-last buffer and the channel slice of it an op may write."""
    batch, _, *spatial = like.shape
    wide = channels_last_buffer(batch, channels + 4, spatial, like.dtype, like.device).fill_(float("nan"))
    return wide, wide[:, 2 : 2 + channels]


def untouched_outside(wide, channels=5):
    return wide[:, :2].isnan().all() and wide[:, 2 + channels :].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ROW_LAYOUTS)
def test_channel_rows_float64(device, layout):
    """Every per-channel operator on channel slices of channels-last buffers
    (each sample's pixels a row of channels, rows a fixed stride apart),
    against the reference, and written in place into such slices."""
    x = row_slice(layout, device=device)
    grad = row_slice(layout, device=device, seed=1)
    assert x.stride(1) == 1 and not x.is_contiguous()
    weight, bias = bn_vectors(5, device=device)
    mean, var = ops.channel_stats(x)
    ref_mean, ref_var = stats_of(x.contiguous())
    assert rel_error(mean, ref_mean) <= 1e-13 and rel_error(var, ref_var) <= 1e-13

    wide, copy = nan_row_slice(x)
    stats = torch.empty(2, 5, dtype=torch.float64, device=device)
    ops.copy_with_stats(x, copy, stats[0], stats[1])
    assert torch.equal(copy, x) and untouched_outside(wide)
    assert rel_error(stats[0], ref_mean) <= 1e-13 and rel_error(stats[1], ref_var) <= 1e-13

    wide, out = nan_row_slice(x)
    ops.bn_relu_out(x, mean, var, weight, bias, 1e-3, out)
    assert rel_error(out, reference.bn_relu(x.contiguous(), mean, var, weight, bias, 1e-3)) <= 1e-13
    assert untouched_outside(wide)

    for batch_stats in (True, False):
        expected = _batch_norm_relu_grads(x.contiguous(), weight, bias, grad.contiguous(), 1e-3, batch_stats, mean, var)
        ours = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 1e-3, batch_stats)
        for name, a, b in zip(("input", "weight", "bias"), ours, expected):
            assert rel_error(a, b) <= 1e-12, (name, batch_stats)
        wide, total = nan_row_slice(x)
        total.zero_()
        sums = ops.bn_relu_backward_accumulate(grad, x, mean, var, weight, bias, 1e-3, batch_stats, total)
        assert rel_error(total, expected[0]) <= 1e-12 and untouched_outside(wide)
        assert rel_error(sums[0], expected[1]) <= 1e-12 and rel_error(sums[1], expected[2]) <= 1e-12

    sums = ops.bn_relu_backward_sums(grad, x, mean, var, weight, bias, 1e-3)
    wide, written = nan_row_slice(x)
    count = torch.tensor(x.numel() // 5, device=device)
    ops.bn_relu_backward_input(grad, x, mean, var, weight, bias, 1e-3, *sums, count, False, written)
    whole = _batch_norm_relu_grads(x.contiguous(), weight, bias, grad.contiguous(), 1e-3, True, mean, var)
    assert rel_error(written, whole[0]) <= 1e-12 and untouched_outside(wide)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_channel_rows_low_precision_equal_the_planes(device, dtype):
    """In float32, bfloat16 and half, the row walk gives what the plane walk
    gives: elementwise results bit for bit, sums within rounding."""
    x = row_slice("2d", dtype=dtype, device=device)
    grad = row_slice("2d", dtype=dtype, device=device, seed=1)
    weight, bias = bn_vectors(5, dtype=torch.float32, device=device)
    mean, var = ops.channel_stats(x)
    plane_mean, plane_var = ops.channel_stats(x.contiguous())
    assert rel_error(mean, plane_mean) <= 1e-6 and rel_error(var, plane_var) <= 1e-6
    out = torch.empty_like(x)  # a channels-last destination
    ops.bn_relu_out(x, plane_mean, plane_var, weight, bias, 1e-5, out)
    assert torch.equal(out, ops.bn_relu(x.contiguous(), plane_mean, plane_var, weight, bias, 1e-5))
    total = torch.zeros_like(x)
    ours = ops.bn_relu_backward_accumulate(grad, x, plane_mean, plane_var, weight, bias, 1e-5, True, total)
    planes = ops.bn_relu_backward(grad.contiguous(), x.contiguous(), plane_mean, plane_var, weight, bias, 1e-5, True)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert rel_error(total, planes[0]) <= tolerance
    assert rel_error(ours[0], planes[1]) <= 1e-5 and rel_error(ours[1], planes[2]) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_channel_rows_of_many_channels_and_rows_equal_the_planes(device, dtype):
    """37 channels of a 45-channel channels-last buffer, 2·16·16 rows: on
    CUDA several tiles of 32 channels (the last one partial) and several
    chunks of rows per channel, which smaller cases never reach."""
    x = channels_last_buffer(2, 45, (16, 16), dtype, device)[:, 3:40]
    grad = channels_last_buffer(2, 45, (16, 16), dtype, device, seed=1)[:, 3:40]
    weight, bias = bn_vectors(37, dtype=math_dtype(dtype), device=device)
    mean, var = ops.channel_stats(x)
    plane_mean, plane_var = ops.channel_stats(x.contiguous())
    close = 1e-13 if dtype == torch.float64 else 1e-5
    assert rel_error(mean, plane_mean) <= close and rel_error(var, plane_var) <= close
    wide = channels_last_buffer(2, 45, (16, 16), dtype, device).fill_(float("nan"))
    ops.bn_relu_out(x, plane_mean, plane_var, weight, bias, 1e-5, wide[:, 3:40])
    assert torch.equal(wide[:, 3:40], ops.bn_relu(x.contiguous(), plane_mean, plane_var, weight, bias, 1e-5))
    assert wide[:, :3].isnan().all() and wide[:, 40:].isnan().all()
    total = torch.zeros_like(x)
    ours = ops.bn_relu_backward_accumulate(grad, x, plane_mean, plane_var, weight, bias, 1e-5, True, total)
    planes = ops.bn_relu_backward(grad.contiguous(), x.contiguous(), plane_mean, plane_var, weight, bias, 1e-5, True)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    assert rel_error(total, planes[0]) <= tolerance
    assert rel_error(ours[0], planes[1]) <= close and rel_error(ours[1], planes[2]) <= close


@pytest.mark.parametrize("maps", [(60, 40), (6, 4)], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_channel_row_reductions_do_not_depend_on_the_thread_count(dtype, maps):
    """300 of 310 channels over 2·60·40 rows: several chunks of rows and
    blocks of channels, which threads take in turn; over 2·6·4 rows, one
    chunk, whose blocks of channels narrow as the threads outnumber them.
    The sums are added up in a fixed order, so 1, 2, 5 and 8 threads give the
    same bits."""
    x = channels_last_buffer(2, 310, maps, dtype, "cpu")[:, 5:305]
    grad = channels_last_buffer(2, 310, maps, dtype, "cpu", seed=1)[:, 5:305]
    weight, bias = bn_vectors(300, dtype=math_dtype(dtype))

    def results():
        mean, var = ops.channel_stats(x)
        total = torch.ones_like(x)
        sums = ops.bn_relu_backward_accumulate(grad, x, mean, var, weight, bias, 1e-5, True, total)
        return mean, var, total, *sums

    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, 2, 5, 8):
            torch.set_num_threads(count)
            runs.append(results())
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize("device", DEVICES)
def test_channel_rows_are_walked_in_place(device):
    """A channels-last input and destination: no copy into planes, the whole
    point of walking rows."""
    x = row_slice("2d", dtype=torch.float32, device=device)
    weight, bias = bn_vectors(5, dtype=torch.float32, device=device)
    mean, var = ops.channel_stats(x)
    wide, out = nan_row_slice(x)
    grad = row_slice("2d", dtype=torch.float32, device=device, seed=1)
    total, stats = torch.zeros_like(x), torch.empty(2, 5, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        ops.channel_stats(x)
        ops.copy_with_stats(x, out, stats[0], stats[1])
        ops.bn_relu_out(x, mean, var, weight, bias, 1e-5, out)
        ops.bn_relu_backward_accumulate(grad, x, mean, var, weight, bias, 1e-5, True, total)
    names = [e.name for e in profile.events()]
    # The CPU's copy_with_stats copies with ATen, straight into its destination.
    assert names.count("aten::copy_") == (1 if device == "cpu" else 0), names
    assert not {"aten::contiguous", "aten::clone"} & set(names), names


def test_opcheck_with_channel_rows():
    x = row_slice("2d")
    weight, bias = bn_vectors(5)
    mean, var = stats_of(x.contiguous())
    grad = row_slice("2d", seed=1)
    stats = torch.zeros(2, 5, dtype=torch.float64)
    torch.library.opcheck(ops.channel_stats.default, (x,))
    torch.library.opcheck(ops.copy_with_stats.default, (x, nan_row_slice(x)[1], stats[0], stats[1]))
    torch.library.opcheck(ops.bn_relu_out.default, (x, mean, var, weight, bias, 1e-5, nan_row_slice(x)[1]))
    torch.library.opcheck(ops.bn_relu.default, (x, mean, var, weight, bias, 1e-5))
    for batch_stats in (True, False):
        torch.library.opcheck(ops.bn_relu_backward.default, (grad, x, mean, var, weight, bias, 1e-5, batch_stats))
        torch.library.opcheck(ops.bn_relu_backward_accumulate.default,
                              (grad, x, mean, var, weight, bias, 1e-5, batch_stats, torch.zeros_like(x)))
    sums = ops.bn_relu_backward_sums(grad, x, mean, var, weight, bias, 1e-5)
    torch.library.opcheck(ops.bn_relu_backward_sums.default, (grad, x, mean, var, weight, bias, 1e-5))
    torch.library.opcheck(ops.bn_relu_backward_input.default,
                          (grad, x, mean, var, weight, bias, 1e-5, *sums, torch.tensor(x.numel() // 5), True,
                           torch.zeros_like(x)))


# --- gradcheck ----------------------------------------------------------------


def test_gradcheck_channel_stats():
    x = channel_slice(batch=2, channels=3, height=2, width=3).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.channel_stats(t), (x,))


def test_gradcheck_bn_relu():
    x = channel_slice(batch=2, channels=3, height=2, width=3).detach().requires_grad_()
    weight, bias = (v.requires_grad_() for v in bn_vectors(3))
    mean, var = (v.detach().requires_grad_() for v in stats_of(x.detach()))
    assert torch.autograd.gradcheck(ops.bn_relu, (x, mean, var, weight, bias, 1e-3))


def test_composed_ops_give_batch_norm_gradients():
    """channel_stats → bn_relu under autograd equals relu(batch_norm) and
    equals the fused batch-statistics backward."""
    x = channel_slice(batch=2, channels=3, height=3, width=3).detach().requires_grad_()
    weight, bias = bn_vectors(3)
    grad = torch.randn(x.shape, dtype=torch.float64)
    mean, var = ops.channel_stats(x)
    ops.bn_relu(x, mean, var, weight, bias, 1e-5).backward(grad)
    expected = _batch_norm_relu_grads(x, weight, bias, grad, 1e-5, True)[0]
    fused = ops.bn_relu_backward(grad, x.detach(), mean.detach(), var.detach(), weight, bias, 1e-5, True)[0]
    assert rel_error(x.grad, expected) <= 1e-12
    assert rel_error(fused, expected) <= 1e-12


# --- opcheck ------------------------------------------------------------------


def _bn_args(requires_grad):
    x = channel_slice(batch=2, channels=3, height=3, width=2)
    weight, bias = bn_vectors(3)
    mean, var = stats_of(x)
    args = [x.contiguous(), mean, var, weight, bias]
    return [a.detach().clone().requires_grad_(requires_grad) for a in args]


def test_opcheck_channel_stats():
    torch.library.opcheck(ops.channel_stats.default, (_bn_args(True)[0],))
    torch.library.opcheck(ops.channel_stats.default, (channel_slice(),))


def test_opcheck_channel_stats_out_and_copy_with_stats():
    x = channel_slice()
    stats = torch.zeros(2, 12, dtype=torch.float64)
    torch.library.opcheck(ops.channel_stats_out.default, (x, stats[0, 3:8], stats[1, 3:8]))
    buffer = torch.zeros(3, 11, 4, 6, dtype=torch.float64)
    torch.library.opcheck(ops.copy_with_stats.default, (x, buffer[:, 4:9], stats[0, :5], stats[1, :5]))


def test_opcheck_bn_relu():
    torch.library.opcheck(ops.bn_relu.default, (*_bn_args(True), 1e-5))
    out = torch.empty(2, 3, 3, 2, dtype=torch.float64)
    torch.library.opcheck(ops.bn_relu_out.default, (*_bn_args(False), 1e-5, out))


@pytest.mark.parametrize("batch_stats", [True, False])
def test_opcheck_bn_relu_backward(batch_stats):
    x, mean, var, weight, bias = _bn_args(False)
    grad = torch.randn_like(x)
    torch.library.opcheck(ops.bn_relu_backward.default, (grad, x, mean, var, weight, bias, 1e-5, batch_stats))
    grad_sum = torch.randn_like(x)
    torch.library.opcheck(
        ops.bn_relu_backward_accumulate.default, (grad, x, mean, var, weight, bias, 1e-5, batch_stats, grad_sum)
    )


def test_opcheck_backward_in_two_passes():
    x, mean, var, weight, bias = _bn_args(False)
    grad = torch.randn_like(x)
    torch.library.opcheck(ops.bn_relu_backward_sums.default, (grad, x, mean, var, weight, bias, 1e-5))
    sums = ops.bn_relu_backward_sums(grad, x, mean, var, weight, bias, 1e-5)
    count = torch.tensor(x.numel() // x.shape[1])
    for accumulate in (False, True):
        torch.library.opcheck(ops.bn_relu_backward_input.default,
                              (grad, x, mean, var, weight, bias, 1e-5, *sums, count, accumulate, torch.randn_like(x)))


def test_backward_input_refuses_a_bad_count_or_sums_before_writing():
    x, mean, var, weight, bias = _bn_args(False)
    grad, out = torch.randn_like(x), torch.zeros_like(x)
    sums = ops.bn_relu_backward_sums(grad, x, mean, var, weight, bias, 1e-5)
    args = (grad, x, mean, var, weight, bias, 1e-5)
    with pytest.raises(ValueError, match=r"expected count to be one int64 value \(values per channel\), got a Float"):
        ops.bn_relu_backward_input(*args, *sums, torch.tensor(12.0), False, out)
    with pytest.raises(ValueError, match=r"expected grad_bias of shape \[3\].*got shape \[2\]"):
        ops.bn_relu_backward_input(*args, sums[0], sums[1][:2], torch.tensor(12), False, out)
    assert (out == 0).all()


def _running_stats_args(momenta, count=12, dtype=torch.float64):
    """Norms of 4 and 3 channels reading statistics at offsets 0 and 5 of 9."""
    g = torch.Generator().manual_seed(3)
    sizes, offsets = (4, 3), [0, 5]
    return (
        [torch.rand(n, generator=g, dtype=dtype) for n in sizes],
        [torch.rand(n, generator=g, dtype=dtype) + 0.5 for n in sizes],
        [torch.tensor(3), torch.tensor(0)],
        list(momenta), offsets,
        torch.randn(9, generator=g, dtype=torch.float64), torch.rand(9, generator=g, dtype=torch.float64),
        torch.tensor(count),
    )


@pytest.mark.parametrize("momentum", [0.1, None])
def test_opcheck_update_running_stats(momentum):
    torch.library.opcheck(ops.update_running_stats.default, _running_stats_args([momentum, 0.3]))


def _block_forward_args(training, drop_rate=0.0, recompute=False, requires_grad=True, bn_size=2,
                        whole_channels=False):
    """dense_block_forward's arguments by name, for a 2-layer block."""
    block, _ = make_pair(2, 3, 2, bn_size=bn_size, drop_rate=drop_rate)
    block.train(training)
    block.requires_grad_(requires_grad)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=requires_grad)
    return block_forward_arguments(
        block, x, dropout_p=drop_rate if training else 0.0, recompute=recompute, save_for_backward=requires_grad,
        dropout_whole_channels=whole_channels,
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "recompute, bn_size", [(False, 2), (True, 2), (False, 0)], ids=["keep-bottleneck", "recompute", "plain"]
)
def test_opcheck_dense_block_forward(training, recompute, bn_size):
    for requires_grad in (True, False):
        args = _block_forward_args(training, recompute=recompute, requires_grad=requires_grad, bn_size=bn_size)
        torch.library.opcheck(ops.dense_block_forward.default, positional(ops.dense_block_forward.default, args))


def test_opcheck_dense_block_with_float32_parameters_and_bfloat16_maps():
    """Autocast's mix: float32 norms and conv weights beside bfloat16 maps
    (the weights cast inside, a layer at a time; their gradients in float32)."""
    block, _ = make_pair(2, 3, 2, bn_size=2, dtype=torch.float32)
    x = torch.randn(2, 3, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    args = block_forward_arguments(block, x)
    torch.library.opcheck(ops.dense_block_forward.default, positional(ops.dense_block_forward.default, args))
    opcheck_block_backward(args)


@pytest.mark.parametrize("whole_channels", [False, True], ids=["values", "whole-channels"])
def test_opcheck_dense_block_forward_with_dropout(whole_channels):
    # Random masks differ between the eager and compiled runs that
    # test_aot_dispatch_dynamic compares, so only schema and fake kernel here;
    # the seeded parity tests cover the values.
    torch.library.opcheck(
        ops.dense_block_forward.default,
        positional(ops.dense_block_forward.default,
                   _block_forward_args(True, drop_rate=0.5, whole_channels=whole_channels)),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bn_size", [2, 0], ids=["bottleneck", "plain"])
@pytest.mark.parametrize("whole_channels", [False, True], ids=["values", "whole-channels"])
def test_opcheck_dense_block_backward(training, bn_size, whole_channels):
    opcheck_block_backward(_block_forward_args(training, drop_rate=0.3, bn_size=bn_size, whole_channels=whole_channels))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bn_size", [2, 0], ids=["bottleneck", "plain"])
@pytest.mark.parametrize("channels_last", ["input", "weights"])
def test_a_channels_last_block_gives_what_its_fake_kernel_says(device, bn_size, channels_last):
    """A channels-last input makes the block compute channels last (its
    buffer the output, the bottlenecks, the dropout masks, the input's
    gradient); channels-last weights alone do not (cuDNN and oneDNN would
    follow them: the block gives its convolutions weights in its input's
    layout). Weight gradients come back with their weights' strides, which
    AccumulateGrad would otherwise copy them into. The fake kernels say the
    same. float32 on CUDA, where cuDNN computes float64 in NCHW whatever its
    input."""
    dtype = torch.float32 if device == "cuda" else torch.float64
    block, _ = make_pair(3, 4, 3, bn_size=bn_size, drop_rate=0.3, dtype=dtype)
    block.to(device=device)
    x = torch.randn(2, 4, 5, 5, dtype=dtype, device=device, requires_grad=True)
    if channels_last == "weights":
        block.to(memory_format=torch.channels_last)
    else:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    args = block_forward_arguments(block, x, dropout_p=0.3)
    forward, backward = ops.dense_block_forward.default, ops.dense_block_backward.default
    torch.library.opcheck(forward, positional(forward, args),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        results = dict(zip(result_names(forward), forward(*positional(forward, args))))
    layout = torch.channels_last if channels_last == "input" else torch.contiguous_format
    maps = [results["output"], *results["bottlenecks"], *results["dropout_masks"]]
    assert results["dropout_masks"] and all(t.is_contiguous(memory_format=layout) for t in maps)
    backward_args = {**{n: [t.detach() for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
                        else v.detach() if isinstance(v, torch.Tensor) else v for n, v in args.items()},
                     **results, "grad_output": torch.randn_like(results["output"])}
    grad_input, *parameter_grads = backward(*positional(backward, backward_args))
    assert grad_input.is_contiguous(memory_format=layout)
    for name, grads in zip(result_names(backward)[1:], parameter_grads):
        assert [g.stride() for g in grads] == [p.stride() for p in backward_args[name.removeprefix("grad_")]], name


def test_channel_dropout_draws_what_feature_dropout_draws():
    """dropout_whole_channels: per (sample, channel) draws, exactly those of
    F.dropout2d (at::feature_dropout) for the same seed; the saved mask is the
    scaled noise, and the backward op refuses a mask of the other kind."""
    args = _block_forward_args(True, drop_rate=0.4, whole_channels=True)
    torch.manual_seed(3)
    results = dict(zip(result_names(ops.dense_block_forward.default), ops.dense_block_forward(**args)))
    masks = results["dropout_masks"]
    assert [tuple(m.shape) for m in masks] == [(2, 2, 1, 1)] * 2
    assert all(set(m.flatten().tolist()) <= {0.0, 1 / 0.6} for m in masks)
    torch.manual_seed(3)
    draws = [torch.nn.functional.dropout2d(torch.ones(2, 2, 3, 3, dtype=torch.float64), 0.4) for _ in range(2)]
    for mask, drawn in zip(masks, draws):
        assert torch.equal(mask.expand(2, 2, 3, 3), drawn)
    backward = {name: args.get(name, results.get(name)) for name in argument_names(ops.dense_block_backward.default)}
    backward.update(grad_output=torch.randn_like(results["output"]),
                    dropout_masks=[torch.ones(2, 2, 3, 3, dtype=torch.bool)] * 2)
    with pytest.raises(ValueError, match=r"expected dropout masks of shape \[2, 2, 1, 1\] and dtype Double, got \[2, 2, 3, 3\] and Bool"):
        ops.dense_block_backward(**backward)
    backward.update(grad_output=torch.randn_like(results["output"], dtype=torch.float32), dropout_masks=masks)
    with pytest.raises(TypeError, match=r"expected grad_output of dtype Double on cpu like the output, got Float on cpu"):
        ops.dense_block_backward(**backward)


def test_block_ops_take_and_give_arguments_by_name():
    """The Python side reads the block operators' arguments and results by
    their schema names: every name it relies on must be in the schemas."""
    forward, backward = ops.dense_block_forward.default, ops.dense_block_backward.default
    forward_args, backward_args = argument_names(forward), argument_names(backward)
    assert forward_args[0] == "input" and backward_args[0] == "grad_output"
    for name in backward_args[1:]:  # each comes from forward's arguments or results
        assert name in forward_args or name in result_names(forward), name
    for name in result_names(backward):  # grad_<forward argument>
        assert name.startswith("grad_") and name[len("grad_"):] in forward_args, name


# --- bad arguments ----------------------------------------------------------


def test_op_errors_name_expected_and_given():
    x, mean, var, weight, bias = _bn_args(False)
    with pytest.raises(ValueError, match=r"expected input to be a 3-D, 4-D or 5-D tensor.*got a 2-D"):
        ops.bn_relu(x[0, 0], mean, var, weight, bias, 1e-5)
    with pytest.raises(ValueError, match=r"expected input to be a 3-D, 4-D or 5-D tensor.*got a 6-D"):
        ops.channel_stats(x[..., None, None])
    with pytest.raises(ValueError, match=r"expected weight of shape \[3\].*got shape \[4\]"):
        ops.bn_relu(x, mean, var, torch.ones(4, dtype=torch.float64), bias, 1e-5)
    with pytest.raises(ValueError, match=r"expected eps >= 0, got -1"):
        ops.bn_relu(x, mean, var, weight, bias, -1.0)
    with pytest.raises(TypeError, match=r"expected input to be float64, float32, float16 or bfloat16, got Long"):
        ops.channel_stats(x.long())
    with pytest.raises(TypeError, match=r"expected out of dtype Double.*got Float"):
        ops.bn_relu_out(x, mean, var, weight, bias, 1e-5, torch.empty(x.shape))
    with pytest.raises(ValueError, match=r"grad_output of shape"):
        ops.bn_relu_backward(x[:1], x, mean, var, weight, bias, 1e-5, True)
    with pytest.raises(ValueError, match=r"expected mean of shape \[3\].*got shape \[2\]"):
        ops.copy_with_stats(x, torch.empty_like(x), mean[:2], var)


LOW_BIT_FLOATS = [
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn_x2") if hasattr(torch, name)
]


@pytest.mark.parametrize("dtype", LOW_BIT_FLOATS, ids=str)
def test_low_bit_floats_are_refused_naming_the_dtypes_the_kernels_take(dtype):
    """torch counts float8 and float4 as floating point, but no kernel (and
    no math type) exists for them: a TypeError, not ATen's dispatch error or
    internal assert."""
    low = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).view(dtype)
    low_vector = torch.zeros(3, dtype=torch.uint8).view(dtype)
    x, ones, zeros = torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3)
    calls = [
        lambda: ops.channel_stats(low),
        lambda: ops.bn_relu(low, zeros, ones, ones, zeros, 1e-5),
        lambda: ops.bn_relu(x, zeros, ones, low_vector, zeros, 1e-5),
        lambda: ops.transition_forward(low, ones, zeros, [], 1e-5, torch.randn(2, 3, 1, 1)),
        lambda: ops.update_running_stats(
            [low_vector], [low_vector], [torch.tensor(0)], [0.1], [0], zeros, ones, torch.tensor(4)),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"float64, float32, float16 or bfloat16.*got Float[48]"):
            call()


def test_update_running_stats_errors_name_expected_and_given():
    args = list(_running_stats_args([0.1, 0.1]))
    before = [t.clone() for t in args[0] + args[1] + args[2]]
    bad_offsets = args[:4] + [[0, 7]] + args[5:]
    with pytest.raises(ValueError, match=r"norm 1: its 3 statistics from offset 7 do not lie within the 9"):
        ops.update_running_stats(*bad_offsets)
    mixed = [[args[0][0], args[0][1].float()], [args[1][0], args[1][1].float()]] + args[2:]
    with pytest.raises(TypeError, match=r"every running statistic in one floating-point dtype \(Double\), norm 1 has Float"):
        ops.update_running_stats(*mixed)
    with pytest.raises(ValueError, match=r"expected count to be one int64 value, got a Float"):
        ops.update_running_stats(*args[:7], torch.tensor(12.0))
    with pytest.raises(ValueError, match=r"one entry per norm \(2\).*1 offsets"):
        ops.update_running_stats(*args[:4], [0], *args[5:])
    after = args[0] + args[1] + args[2]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing was written


def test_update_running_stats_refuses_tensors_that_share_memory():
    """Each norm is a GPU block of its own: a num_batches_tracked shared by two
    norms would lose an increment, running statistics aliasing the batch
    statistics would race."""
    running_mean, running_var, tracked, momenta, offsets, mean, var, count = _running_stats_args([0.1, None])
    with pytest.raises(RuntimeError, match=r"two of them share memory"):
        ops.update_running_stats(running_mean, running_var, [tracked[0], tracked[0]], momenta, offsets, mean, var, count)
    with pytest.raises(RuntimeError, match=r"two of them share memory"):
        ops.update_running_stats([mean[:4], running_mean[1]], running_var, tracked, momenta, offsets, mean, var, count)
    assert [int(t) for t in tracked] == [3, 0]


def test_block_op_errors_name_expected_and_given():
    args = _block_forward_args(True, requires_grad=False)
    bad = dict(args, input=torch.randn(2, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected an input with 3 channels.*got input of shape \[2, 4, 3, 3\]"):
        ops.dense_block_forward(**bad)
    wrong_conv = list(args["conv1_weight"])
    wrong_conv[1] = torch.randn(4, 6, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 2 conv1.weight should have shape \[4, 5, 1, 1\], got \[4, 6, 1, 1\]"):
        ops.dense_block_forward(**dict(args, conv1_weight=wrong_conv))
    norm1_weight = [args["norm1_weight"][0].float(), args["norm1_weight"][1]]
    with pytest.raises(TypeError, match=r"layer 1 norm1.weight has dtype Float but the input has dtype Double"):
        ops.dense_block_forward(**dict(args, norm1_weight=norm1_weight))
    with pytest.raises(ValueError, match=r"dropout probability has to be between 0 and 1, got 1.5"):
        ops.dense_block_forward(**dict(args, dropout_p=1.5))
