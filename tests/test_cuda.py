"""CUDA: each kernel against the CPU kernel and the reference, the block
against the reference on the GPU, gradcheck, peak memory against the analytic
model, determinism, and the 64-bit index path. Skipped without a GPU."""

import math

import pytest
import torch

from conftest import assert_results_close, make_pair, rel_error, smallest_relu_input, step_results
from densenet_efficient import reference
from densenet_efficient._ops import ops
from densenet_efficient import models
from densenet_efficient.memory import dense_block_peak_bytes
from densenet_efficient.sync import synchronize_batch_norm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Plane sizes: a multiple of every vector width (16-byte loads), an odd one
# (one element at a time), 7x7 and 14x14 (ImageNet's last blocks: vectors
# that cross from one channel's plane into the next), and 1x1; volumes (a
# plane of D·H·W values) and sequences.
PLANES = [(8, 8), (5, 3), (7, 7), (14, 14), (1, 1), (4, 4, 2), (3, 5, 7), (9,)]


def _tolerance(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def _vectors(channels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g) * 0.3


def _slices(batch, channels, plane, dtype, seed, device="cuda"):
    """The layouts the kernels walk differently, made on `device` (moving a
    view between devices would make it contiguous): channels 3..3+C of a
    wider buffer (a sample's planes back to back), the same one element off
    16-byte alignment, and planes spaced apart (each plane its own run)."""
    g = torch.Generator().manual_seed(seed)
    size = math.prod(plane)
    wide = torch.randn(batch, channels + 5, *plane, generator=g, dtype=torch.float64) * 1.5 + 0.3
    flat = torch.randn(batch * (channels + 5) * size + 1, generator=g, dtype=torch.float64)
    spaced = torch.randn(batch, channels, size + 4, generator=g, dtype=torch.float64) * 1.5 + 0.3
    on = dict(dtype=dtype, device=device)
    return {
        "slice": wide.to(**on)[:, 3 : 3 + channels],
        "misaligned": flat.to(**on)[1:].view(batch, channels + 5, *plane)[:, 3 : 3 + channels],
        "spaced": spaced.to(**on)[..., :size].view(batch, channels, *plane),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("layout", ["slice", "misaligned", "spaced"])
def test_kernels_match_cpu_kernels_and_reference(dtype, plane, layout):
    x_cpu = _slices(6, 7, plane, dtype, seed=0, device="cpu")[layout]
    x = _slices(6, 7, plane, dtype, seed=0)[layout]
    assert x.stride() == x_cpu.stride() and torch.equal(x.cpu(), x_cpu)
    math = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = (v.to(math) for v in _vectors(7))
    tol = _tolerance(dtype)

    mean, var = ops.channel_stats(x)
    cpu_mean, cpu_var = ops.channel_stats(x_cpu)
    ref_mean, ref_var = reference.channel_stats(x_cpu.double())
    stats_tol = 1e-12 if dtype == torch.float64 else 1e-5  # float accumulation of exact inputs
    for ours, cpu, ref in ((mean, cpu_mean, ref_mean), (var, cpu_var, ref_var)):
        assert rel_error(ours.cpu(), ref) <= stats_tol
        assert rel_error(ours.cpu(), cpu) <= stats_tol

    copy = torch.full((6, 9, *plane), float("nan"), dtype=dtype, device="cuda")
    copy_stats = torch.full((2, 9), float("nan"), dtype=math, device="cuda")
    ops.copy_with_stats(x, copy[:, 1:8], copy_stats[0, 2:], copy_stats[1, 2:])
    assert torch.equal(copy[:, 1:8], x) and copy[:, 0].isnan().all() and copy[:, 8].isnan().all()
    assert torch.equal(copy_stats[0, 2:], mean) and torch.equal(copy_stats[1, 2:], var)

    # The same statistics on both devices: the affine step rounds as on the
    # CPU, so every ReLU gate agrees and the forward is bitwise equal.
    args_cpu = (cpu_mean, cpu_var, weight, bias, 1e-5)
    args = (cpu_mean.cuda(), cpu_var.cuda(), weight.cuda(), bias.cuda(), 1e-5)
    out = ops.bn_relu(x, *args)
    assert torch.equal(out.cpu(), ops.bn_relu(x_cpu, *args_cpu))
    assert rel_error(out.cpu(), reference.bn_relu(x_cpu, *args_cpu)) <= tol

    scratch = torch.full((6, 12, *plane), float("nan"), dtype=dtype, device="cuda")
    ops.bn_relu_out(x, *args, scratch[:, 2:9])
    assert torch.equal(scratch[:, 2:9], out) and scratch[:, :2].isnan().all() and scratch[:, 9:].isnan().all()

    grad_cpu = _slices(6, 7, plane, dtype, seed=2, device="cpu")[layout]
    grad = _slices(6, 7, plane, dtype, seed=2)[layout]
    for batch_stats in (True, False):
        ours = ops.bn_relu_backward(grad, x, *args, batch_stats)
        cpu = ops.bn_relu_backward(grad_cpu, x_cpu, *args_cpu, batch_stats)
        for name, a, b in zip(("input", "weight", "bias"), ours, cpu):
            assert rel_error(a.cpu(), b) <= tol, (name, batch_stats)
        target = torch.randn(6, 10, *plane, dtype=dtype, device="cuda")
        before = target.clone()
        ops.bn_relu_backward_accumulate(grad, x, *args, batch_stats, target[:, 1:8])
        assert rel_error(target[:, 1:8], before[:, 1:8] + ours[0]) <= tol
        assert torch.equal(target[:, :1], before[:, :1]) and torch.equal(target[:, 8:], before[:, 8:])

    # The two passes apart (synchronised BatchNorm), on one "rank".
    sums = ops.bn_relu_backward_sums(grad, x, *args)
    cpu_sums = ops.bn_relu_backward_sums(grad_cpu, x_cpu, *args_cpu)
    for a, b in zip(sums, cpu_sums):
        assert a.dtype == math and rel_error(a.cpu(), b) <= tol
    count = torch.tensor(x.numel() // x.shape[1], device="cuda")
    target = torch.randn(6, 10, *plane, dtype=dtype, device="cuda")
    before = target.clone()
    ops.bn_relu_backward_input(grad, x, *args, *sums, count, True, target[:, 1:8])
    whole = ops.bn_relu_backward(grad, x, *args, True)[0]
    assert rel_error(target[:, 1:8], before[:, 1:8] + whole) <= tol
    assert torch.equal(target[:, :1], before[:, :1]) and torch.equal(target[:, 8:], before[:, 8:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 40, 32, 32), (256, 3, 14, 14), (8, 5, 128, 127), (4, 6, 32, 32, 33)])
def test_statistics_of_channels_split_over_many_blocks(dtype, shape):
    """Channels of many values are reduced by several blocks each (at least
    1024 vectors per channel here) whose partial results the finalize kernel
    merges: against a float64 reference, offset so cancellation would show."""
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 10
    x = x64.to(dtype).cuda()
    mean, var = ops.channel_stats(x)
    exact_mean, exact_var = reference.channel_stats(x.double().cpu())
    dims = (0, *range(2, x.dim()))
    theirs_var, theirs_mean = torch.var_mean(x.to(mean.dtype), dim=dims, unbiased=False)
    for ours, theirs, exact in ((mean, theirs_mean, exact_mean), (var, theirs_var, exact_var)):
        tolerance = 1e-12 if dtype == torch.float64 else 2 * rel_error(theirs.cpu(), exact) + 1e-6
        assert rel_error(ours.cpu(), exact) <= tolerance
    weight, bias = (v.to(mean.dtype).cuda() for v in _vectors(shape[1]))
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).cuda()
    ours = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 1e-5, True)
    cpu = ops.bn_relu_backward(grad.cpu(), x.cpu(), mean.cpu(), var.cpu(), weight.cpu(), bias.cpu(), 1e-5, True)
    for a, b in zip(ours, cpu):
        assert rel_error(a.cpu(), b) <= _tolerance(dtype)


def test_empty_and_single_plane_inputs():
    empty = torch.empty(0, 4, 3, 3, device="cuda")
    mean, var = ops.channel_stats(empty)
    assert mean.isnan().all() and var.isnan().all()
    weight, bias = (v.cuda() for v in _vectors(4))
    grads = ops.bn_relu_backward(empty, empty, weight, weight, weight, bias, 1e-5, True)
    assert grads[0].shape == empty.shape and (grads[1] == 0).all() and (grads[2] == 0).all()
    one = torch.randn(1, 4, 1, 1, device="cuda")
    assert torch.equal(ops.channel_stats(one)[1], torch.zeros(4, device="cuda"))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-bottleneck", "recompute"])
@pytest.mark.parametrize("spatial", [(7, 7), (3, 4, 5), (11,)], ids=["2d", "3d", "1d"])
def test_block_matches_reference_float64(training, drop_rate, recompute, spatial):
    pair = make_pair(4, 6, 3, drop_rate=drop_rate, recompute_bottleneck=recompute, spatial_dims=len(spatial))
    ours, reference_block = (m.cuda().train(training) for m in pair)
    x = torch.randn(4, 6, *spatial, dtype=torch.float64, device="cuda")
    grad = torch.randn(4, 18, *spatial, dtype=torch.float64, device="cuda")
    assert_results_close(step_results(ours, x, grad), step_results(reference_block, x, grad), 1e-10)


def test_block_float32_within_twice_naive_error():
    ours, naive = (m.float().cuda() for m in make_pair(4, 16, 8))
    exact = make_pair(4, 16, 8)[1].cuda()
    generator = torch.Generator().manual_seed(20)
    x = torch.randn(4, 16, 8, 8, dtype=torch.float64, generator=generator).cuda()
    grad = torch.randn(4, 48, 8, 8, dtype=torch.float64, generator=generator).cuda()
    # Float32 errors are comparable only where no ReLU input is near zero (a
    # gate either side flips moves a gradient by a whole dy): seed 20 keeps
    # every one at least 1e-4 away (1.19e-4, measured on the CPU in float64),
    # about a hundred times float32's error in them here.
    assert smallest_relu_input(exact, x) > 5e-5, "pick inputs that keep ReLU inputs off zero"
    torch.backends.cudnn.allow_tf32 = False  # judge our arithmetic, not TF32 convolutions
    try:
        e = step_results(exact, x, grad)
        mine, theirs = step_results(ours, x.float(), grad.float()), step_results(naive, x.float(), grad.float())
    finally:
        torch.backends.cudnn.allow_tf32 = True
    for name in e:
        if name.endswith("num_batches_tracked"):
            continue
        assert rel_error(mine[name], e[name]) <= 2 * rel_error(theirs[name], e[name]) + 1e-6, name


def test_gradcheck_on_cuda():
    from torch.func import functional_call

    block, _ = make_pair(2, 3, 2, bn_size=2)
    block.cuda()
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in block.parameters())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    # gradcheck wants repeated backwards bit-identical: our kernels are (no
    # atomics); cuDNN's must be asked to be.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        assert torch.autograd.gradcheck(
            lambda x, *p: functional_call(block, dict(zip(names, p)), (x,)), (x, *params))


def _requested_bytes(kind: str) -> int:
    """Bytes the caching allocator was asked for ("current" or "peak"): exact
    tensor sizes, without its rounding (blocks up to 1 MiB larger than asked)."""
    return torch.cuda.memory_stats()[f"requested_bytes.all.{kind}"]


def _peak_step_bytes(num_layers, recompute=False, drop_rate=0.0, channels_last=None, batch=16, size=32, c0=24,
                     k=12):
    """channels_last: None, "weights" (cuDNN would follow them) or "input"
    (the block then computes channels last)."""
    block = make_pair(num_layers, c0, k, dtype=torch.float32, drop_rate=drop_rate, recompute_bottleneck=recompute)[0].cuda()
    if channels_last == "weights":
        block.to(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last == "input" else torch.contiguous_format
    x = torch.randn(batch, c0, size, size, device="cuda").contiguous(memory_format=layout)
    grad = torch.randn(batch, c0 + num_layers * k, size, size, device="cuda").contiguous(memory_format=layout)
    block(x).backward(grad)  # warm-up: cuDNN algorithm choice, allocator
    for p in block.parameters():
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = _requested_bytes("current")
    block(x).backward(grad)
    torch.cuda.synchronize()
    measured = _requested_bytes("peak") - base
    model = dense_block_peak_bytes((batch, c0, size, size), num_layers, k, dtype=torch.float32,
                                   drop_rate=drop_rate, recompute_bottleneck=recompute)
    return measured, model


@pytest.mark.parametrize("options", [{}, {"recompute": True}, {"drop_rate": 0.2}, {"channels_last": "weights"},
                                     {"channels_last": "input"}],
                         ids=["plain", "recompute", "dropout", "channels-last-weights", "channels-last-input"])
def test_peak_memory_follows_the_model_and_is_linear(options):
    """The model counts every tensor; it leaves out cuDNN's workspace
    (measured here on the same convolutions) and small transients: the
    per-channel vectors and the reductions' partial sums (a few hundred KiB
    here). Measured in requested bytes, so the allocator's rounding is out."""
    peaks = {}
    for num_layers in (8, 16, 32):
        measured, model = _peak_step_bytes(num_layers, **options)
        small = 2**20  # the per-channel vectors and partial sums
        workspace = _workspace_bytes(16, 32, 24, num_layers, 12)
        assert model - small <= measured <= model + workspace + small, (num_layers, measured, model, workspace)
        peaks[num_layers] = measured
    # Depth 8→16→32: a line grows twice as much in the second step, a quadratic four times.
    step_16, step_32 = peaks[16] - peaks[8], peaks[32] - peaks[16]
    assert abs(step_32 - 2 * step_16) <= 0.1 * step_32, peaks


def test_repeated_runs_are_identical():
    """Our kernels reduce in a fixed order (no atomics); cuDNN is asked for
    deterministic algorithms; dropout masks come from the seeded generator."""
    torch.backends.cudnn.deterministic, benchmark = True, torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        runs = []
        for _ in range(2):
            block = make_pair(4, 8, 4, dtype=torch.float32, drop_rate=0.2)[0].cuda()
            x = torch.randn(8, 8, 12, 12, generator=torch.Generator().manual_seed(1)).cuda()
            grad = torch.randn(8, 24, 12, 12, generator=torch.Generator().manual_seed(2)).cuda()
            runs.append(step_results(block, x, grad, seed=3))
        for name in runs[0]:
            assert torch.equal(runs[0][name], runs[1][name]), name
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, benchmark


def test_opcheck_on_cuda():
    x = _slices(2, 3, (4, 4), torch.float32, seed=0)["slice"].contiguous().requires_grad_()
    weight, bias = (v.cuda().requires_grad_() for v in _vectors(3))
    mean, var = ops.channel_stats(x.detach())
    torch.library.opcheck(ops.channel_stats.default, (x,))
    torch.library.opcheck(ops.bn_relu.default, (x, mean.requires_grad_(), var.requires_grad_(), weight, bias, 1e-5))
    grad = torch.randn_like(x.detach())
    plain = (grad, x.detach(), mean.detach(), var.detach(), weight.detach(), bias.detach(), 1e-5)
    torch.library.opcheck(ops.bn_relu_backward.default, (*plain, True))
    torch.library.opcheck(ops.bn_relu_backward_accumulate.default, (*plain, True, torch.zeros_like(grad)))
    torch.library.opcheck(ops.bn_relu_out.default, (*plain[1:], torch.empty_like(grad)))
    stats = torch.zeros(2, 3, device="cuda")
    torch.library.opcheck(ops.channel_stats_out.default, (x.detach(), stats[0], stats[1]))
    torch.library.opcheck(ops.copy_with_stats.default, (x.detach(), torch.empty_like(grad), stats[0], stats[1]))
    running = [torch.rand(3, device="cuda") for _ in range(2)]
    torch.library.opcheck(
        ops.update_running_stats.default,
        ([running[0]], [running[1]], [torch.tensor(2, device="cuda")], [None], [0], mean.detach(), var.detach(),
         torch.tensor(32, device="cuda")),
    )


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 32 * 2**30,
    reason="needs a GPU with 32 GiB",
)
def test_index_math_beyond_32_bits():
    """2^31 + a few elements, on the one-element-at-a-time path (odd plane):
    the kernels must switch to 64-bit index arithmetic."""
    channels, plane = 3, (1, 5)
    batch = (2**31 // (channels * 5)) + 1
    x = torch.empty(batch, channels, *plane, device="cuda", dtype=torch.float32)
    x.normal_()
    x[-1] += 100.0  # a last sample whose loss would show in every statistic
    assert x.numel() > 2**31
    mean, var = ops.channel_stats(x)
    expected_var, expected_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    assert rel_error(mean, expected_mean) <= 1e-4 and rel_error(var, expected_var) <= 1e-4
    weight, bias = torch.ones(channels, device="cuda"), torch.zeros(channels, device="cuda")
    out = ops.bn_relu(x, mean, var, weight, bias, 1e-5)
    tail = reference.bn_relu(x[-2:], mean, var, weight, bias, 1e-5)
    assert rel_error(out[-2:], tail) <= 1e-6


def test_one_channel_beyond_32_bit_indices():
    """More than 2^31 values in each channel's planes: the reductions
    (channel_stats, copy_with_stats, the backward's sums) and the backward's
    elementwise pass take their 64-bit index path. The last 2^20 values of
    each channel, past 2^31, are offset: an index that wrapped would miss
    them in every statistic. References in float64, a chunk at a time, gated
    by our own float32 forward (a float64 gate would disagree wherever x·scale
    + shift rounds across zero). About 60 GB of GPU memory."""
    channels, plane, tail = 2, (1, 5), 2**20
    batch = -(-(2**31 + tail) // 5)
    values = batch * 5  # per channel
    torch.cuda.empty_cache()
    if torch.cuda.mem_get_info()[0] < 3 * 4 * channels * values + 2**34:
        pytest.skip("needs about 60 GB of free GPU memory")
    torch.cuda.manual_seed(0)
    x = torch.empty(batch, channels, *plane, device="cuda")
    x.normal_()
    x[-(tail // 5):] += 50.0
    as_channels, step = (lambda v: v.view(1, -1, 1, 1)), 2**24  # chunks: 1.3 GB per float64 temporary
    chunks = [slice(start, start + step) for start in range(0, batch, step)]
    exact_mean = sum(x[rows].double().sum((0, 2, 3)) for rows in chunks) / values
    exact_var = sum((x[rows].double() - as_channels(exact_mean)).square().sum((0, 2, 3)) for rows in chunks) / values
    mean, var = ops.channel_stats(x)
    assert rel_error(mean, exact_mean) <= 1e-5 and rel_error(var, exact_var) <= 1e-5
    copy, stats = torch.empty_like(x), torch.empty(2, channels, device="cuda")
    ops.copy_with_stats(x, copy, stats[0], stats[1])
    assert torch.equal(copy, x) and torch.equal(stats[0], mean) and torch.equal(stats[1], var)
    del copy

    weight, bias = torch.tensor([1.3, 0.7], device="cuda"), torch.tensor([0.1, -0.2], device="cuda")
    grad = torch.empty_like(x)
    grad.normal_()
    invstd = torch.rsqrt(var.double() + 1e-5)

    def gated(rows):  # the gradient through our ReLU, and x − μ, in float64
        passes = ops.bn_relu(x[rows], mean, var, weight, bias, 1e-5) > 0
        return grad[rows].double() * passes, x[rows].double() - as_channels(mean.double())

    sum_g = torch.zeros(channels, dtype=torch.float64, device="cuda")
    sum_g_centered = torch.zeros_like(sum_g)
    for rows in chunks:
        g, centered = gated(rows)
        sum_g += g.sum((0, 2, 3))
        sum_g_centered += (g * centered).sum((0, 2, 3))

    def expected_grad(rows):
        g, centered = gated(rows)
        return as_channels(weight.double() * invstd) * (
            g - as_channels(sum_g / values) - centered * as_channels(invstd * invstd * sum_g_centered / values))

    # The first samples, those around flat element 2^31, and the last.
    checked = [slice(0, 1000), slice(2**31 // 10 - 500, 2**31 // 10 + 500), slice(batch - 1000, batch)]
    grad_input, grad_weight, grad_bias = ops.bn_relu_backward(grad, x, mean, var, weight, bias, 1e-5, True)
    assert rel_error(grad_weight, sum_g_centered * invstd) <= 1e-5 and rel_error(grad_bias, sum_g) <= 1e-5
    for rows in checked:
        assert rel_error(grad_input[rows], expected_grad(rows)) <= 1e-5, rows
    ops.bn_relu_backward_accumulate(grad, x, mean, var, weight, bias, 1e-5, True, grad_input)
    for rows in checked:
        assert rel_error(grad_input[rows], 2 * expected_grad(rows)) <= 1e-5, rows
    sums = ops.bn_relu_backward_sums(grad, x, mean, var, weight, bias, 1e-5)
    assert torch.equal(sums[0], grad_weight) and torch.equal(sums[1], grad_bias)
    count = torch.tensor(values, device="cuda")
    ops.bn_relu_backward_input(grad, x, mean, var, weight, bias, 1e-5, *sums, count, False, grad_input)
    for rows in checked:
        assert rel_error(grad_input[rows], expected_grad(rows)) <= 1e-5, rows


def test_elementwise_index_window_just_below_int32_max():
    """The element count fits in int32 but count + one grid stride does not:
    the window where a 32-bit grid-stride index would wrap negative and write
    out of bounds. Guards on both sides of the output must stay untouched."""
    grid_stride = torch.cuda.get_device_properties(0).multi_processor_count * 16 * 256
    plane = 5  # odd: one element per vector, so the vector count is the element count
    batch = (2**31 - 1 - grid_stride // 2) // plane
    count = batch * plane
    assert count < 2**31 - 1 < count + grid_stride
    if 2 * count * 4 + 2**30 > torch.cuda.mem_get_info()[0]:
        pytest.skip("needs two float tensors of 2^31 elements")
    x = torch.empty(batch, 1, 1, plane, device="cuda")
    x.uniform_(-1, 1)
    guard = 2**20
    storage = torch.full((count + 2 * guard,), float("nan"), device="cuda")
    out = storage[guard : guard + count].view(batch, 1, 1, plane)
    ones, zeros = torch.ones(1, device="cuda"), torch.zeros(1, device="cuda")
    ops.bn_relu_out(x, zeros, ones, ones, zeros, 0.0, out)
    assert storage[:guard].isnan().all() and storage[guard + count :].isnan().all()
    assert rel_error(out[-1000:], x[-1000:].clamp_min(0)) <= 1e-6
    assert rel_error(out[:1000], x[:1000].clamp_min(0)) <= 1e-6


def test_sync_batch_norm_with_nccl_on_one_rank():
    """Synchronised efficient blocks with NCCL (which refuses CPU tensors):
    on a world of one rank they equal the unsynchronised block, train and
    eval, forward and backward."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        for training in (True, False):
            synced, plain = (m.cuda().train(training) for m in (make_pair(3, 6, 4)[0], make_pair(3, 6, 4)[0]))
            synced.sync_group = dist.group.WORLD.group_name
            x = torch.randn(4, 6, 7, 7, dtype=torch.float64, device="cuda")
            grad = torch.randn(4, 18, 7, 7, dtype=torch.float64, device="cuda")
            assert_results_close(step_results(synced, x, grad), step_results(plain, x, grad), 1e-10)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative-average"])
def test_a_training_step_of_a_block_captures_in_a_cuda_graph(momentum):
    """No host synchronisation anywhere in a step (momentum=None reads
    num_batches_tracked on the device): forward + backward capture in a CUDA
    graph, and a replay equals an eager step."""
    import copy

    block = make_pair(4, 8, 6, dtype=torch.float32, momentum=momentum)[0].cuda()
    x = torch.randn(8, 8, 12, 12, device="cuda", requires_grad=True)
    grad = torch.randn(8, 32, 12, 12, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as the CUDA graph docs ask
        for _ in range(2):
            block.zero_grad(set_to_none=True)
            block(x).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    block.zero_grad(set_to_none=True)
    x.grad = None
    eager = copy.deepcopy(block)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = block(x)
        captured_out.backward(grad)
    graph.replay()
    torch.cuda.synchronize()
    captured = {"output": captured_out.detach().clone(), "input.grad": x.grad.clone()}
    captured.update({f"{n}.grad": p.grad.clone() for n, p in block.named_parameters()})
    captured.update({n: b.clone() for n, b in block.named_buffers()})
    expected = step_results(eager, x.detach(), grad)
    assert_results_close(captured, expected, 1e-5)


def _workspace_bytes(batch, size, c0, num_layers, k, bn_size=4):
    """What cuDNN's convolutions take beyond their inputs and outputs (their
    workspace), measured on the block's widest convolutions, forward and
    backward: the part of a step's peak the analytic model leaves out."""
    widest = c0 + (num_layers - 1) * k
    convs = [(widest, bn_size * k, 1), (bn_size * k, k, 3)]
    worst = 0
    for channels_in, channels_out, kernel in convs:
        x = torch.randn(batch, channels_in, size, size, device="cuda")
        w = torch.randn(channels_out, channels_in, kernel, kernel, device="cuda")
        g = torch.randn(batch, channels_out, size, size, device="cuda")
        for run in (
            lambda: torch.nn.functional.conv2d(x, w, padding=kernel // 2),
            lambda: torch.ops.aten.convolution_backward(
                g, x, w, None, [1, 1], [kernel // 2] * 2, [1, 1], False, [0, 0], 1, [True, True, False]),
        ):
            run()  # algorithm choice first
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = _requested_bytes("current")
            results = run()
            torch.cuda.synchronize()
            kept = _requested_bytes("current") - base  # the results
            worst = max(worst, _requested_bytes("peak") - base - kept)
            del results
    return worst


def test_torch_compile_fullgraph_on_cuda():
    import copy

    from densenet_efficient import models

    torch.manual_seed(0)
    model = models.densenet_bc(22, 6).cuda()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    projection = torch.randn(8, 10, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    try:
        for _ in range(2):
            outputs = []
            for m in (compiled, eager):
                m.zero_grad(set_to_none=True)
                out = m(x)
                (out * projection).sum().backward()
                outputs.append(out.detach())
            assert rel_error(outputs[0], outputs[1]) <= 1e-5
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                assert (p.grad - q.grad).norm() <= 1e-4 * max(q.grad.norm(), 1e-2), name
    finally:
        torch.backends.cudnn.allow_tf32 = True


@pytest.mark.parametrize(
    "mode, recompute", [("naive", False), ("checkpoint", False), ("efficient", False), ("efficient", True)],
    ids=["naive", "checkpoint", "efficient", "efficient-recompute"],
)
def test_training_step_peak_within_ten_percent_of_the_estimate(mode, recompute):
    """The estimate counts tensors; max_memory_allocated also holds the
    workspaces cuBLAS keeps from the classifier's first GEMMs on (32 MiB per
    handle on sm_90; autograd's device thread has a handle of its own),
    measured here by releasing them, and cuDNN's transient workspaces, which
    stay within the tolerance at this size."""
    from densenet_efficient import models
    from densenet_efficient.memory import estimate_training_step

    torch.manual_seed(0)
    model = models.densenet_bc_100_12(mode=mode, recompute_bottleneck=recompute).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # creates the momentum buffers and the cuBLAS workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    inputs = x.numel() * x.element_size() + y.numel() * y.element_size()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    held = torch.cuda.memory_allocated()
    torch._C._cuda_clearCublasWorkspaces()
    cublas_workspace = held - torch.cuda.memory_allocated()
    measured = peak - inputs - cublas_workspace
    predicted = estimate_training_step(model, (64, 3, 32, 32)).total
    assert abs(measured - predicted) <= 0.1 * predicted, (measured, predicted, cublas_workspace)


def test_synchronize_batch_norm_uses_torch_sync_batch_norm_on_cuda(one_rank_world):
    torch.manual_seed(0)
    model = models.densenet_bc(16, 4, mode="naive").cuda()
    norms = [n for n, m in model.named_modules() if type(m) is torch.nn.BatchNorm2d]
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    synchronize_batch_norm(model)
    modules = dict(model.named_modules())
    assert norms and all(type(modules[n]) is torch.nn.SyncBatchNorm for n in norms)
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == tensors.keys() and all(now[n] is t for n, t in tensors.items())
    torch.manual_seed(0)
    plain = models.densenet_bc(16, 4, mode="naive").cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    assert rel_error(model(x), plain(x)) <= 1e-5
    assert rel_error(modules[norms[0]].running_mean, dict(plain.named_buffers())[f"{norms[0]}.running_mean"]) <= 1e-5


@pytest.mark.parametrize("spatial_dims", [2, 3], ids=["2d", "3d"])
def test_a_channels_last_model_matches_naive_and_computes_channels_last(spatial_dims):
    """A channels-last model (and image) on CUDA: the efficient blocks and
    transitions compute channels last in 2-D (the CUDA kernels walk the
    buffers' channel rows), contiguous in 3-D (CUDA's 3-D average pooling
    has no channels_last_3d kernel), and match naive mode, which follows the
    channels-last weights."""
    import copy

    torch.manual_seed(0)
    ours = models.DenseNet(4, (2, 2), 8, num_classes=5, spatial_dims=spatial_dims).double().cuda()
    reference_model = copy.deepcopy(ours)
    reference_model.mode = "naive"
    memory_format = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    for model in (ours, reference_model):
        model.to(memory_format=memory_format)
    computed = memory_format if spatial_dims == 2 else torch.contiguous_format
    layouts = []
    for module in ours.features.children():
        if isinstance(module, (models.Transition, models.DenseBlock)):
            module.register_forward_hook(lambda m, args, out: layouts.append(out.is_contiguous(memory_format=computed)))
    x = torch.randn(2, 3, *[32] * spatial_dims, dtype=torch.float64, device="cuda")
    x = x.contiguous(memory_format=memory_format)
    grad = torch.randn(2, 5, dtype=torch.float64, device="cuda")
    mine, expected = step_results(ours, x, grad), step_results(reference_model, x, grad)
    assert layouts and all(layouts), layouts
    assert_results_close(mine, expected, 1e-9, zero=1e-12)
