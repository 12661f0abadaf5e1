"""Each custom operator against its pure-PyTorch reference (float64 tight;
float32/bfloat16/half within 2x of PyTorch's own error vs float64), gradcheck
of the differentiable ones, and torch.library.opcheck of every one."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_pair, rel_error, requires_cuda
from densenet_efficient import reference
from densenet_efficient._ops import ops

DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]
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


def stats_of(x, eps=1e-5):
    mean, var = reference.channel_stats(x)
    return mean, torch.rsqrt(var + eps)


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
def test_bn_relu_float64(device):
    x = channel_slice(device=device)
    weight, bias = bn_vectors(5, device=device)
    mean, invstd = stats_of(x)
    out = ops.bn_relu(x, mean, invstd, weight, bias)
    expected = torch.relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5))
    assert rel_error(out, expected) <= 1e-13
    assert rel_error(out, reference.bn_relu(x, mean, invstd, weight, bias)) <= 1e-13
    assert out.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_bn_relu_low_precision(device, dtype):
    x64 = channel_slice(device=device)
    weight, bias = bn_vectors(5, dtype=torch.float32, device=device)
    mean, invstd = (v.float() for v in stats_of(x64))
    x = x64.to(dtype)
    exact = reference.bn_relu(x.double(), mean.double(), invstd.double(), weight.double(), bias.double())
    ours = ops.bn_relu(x, mean, invstd, weight, bias)
    theirs = torch.relu(F.batch_norm(x.float(), mean, 1 / invstd**2 - 1e-5, weight, bias, eps=1e-5)).to(dtype)
    assert ours.dtype == dtype
    assert rel_error(ours, exact) <= 2 * rel_error(theirs, exact) + 1e-7


@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_out_writes_into_a_strided_destination(device):
    x = channel_slice(device=device)
    weight, bias = bn_vectors(5, device=device)
    mean, invstd = stats_of(x)
    buffer = torch.full((3, 9, 4, 6), float("nan"), dtype=torch.float64, device=device)
    out = buffer[:, 1:6]
    ops.bn_relu_out(x, mean, invstd, weight, bias, out)
    assert rel_error(out, reference.bn_relu(x, mean, invstd, weight, bias)) <= 1e-13
    assert buffer[:, :1].isnan().all() and buffer[:, 6:].isnan().all()


def _batch_norm_relu_grads(x, weight, bias, grad, eps, batch_stats, mean=None, invstd=None):
    """PyTorch's own gradients of relu(batch_norm(x))."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    if batch_stats:
        y = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    else:
        y = reference.bn_relu(x, mean, invstd, weight, bias)
    torch.relu(y).backward(grad)
    return x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "fixed-stats"])
def test_bn_relu_backward_float64(device, batch_stats):
    x = channel_slice(device=device)
    weight, bias = bn_vectors(5, device=device)
    mean, invstd = stats_of(x, eps=1e-3)
    grad = torch.randn(x.shape, dtype=torch.float64, device=device)
    expected = _batch_norm_relu_grads(x, weight, bias, grad, 1e-3, batch_stats, mean, invstd)
    ours = ops.bn_relu_backward(grad, x, mean, invstd, weight, bias, batch_stats)
    for name, a, b in zip(("input", "weight", "bias"), ours, expected):
        assert rel_error(a, b) <= 1e-12, name

    buffer = torch.randn(3, 9, 4, 6, dtype=torch.float64, device=device)
    before = buffer.clone()
    grad_weight, grad_bias = ops.bn_relu_backward_accumulate(
        grad, x, mean, invstd, weight, bias, batch_stats, buffer[:, 2:7]
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
    mean, invstd = (v.float() for v in stats_of(x.double()))  # batch statistics of this very input
    exact = _batch_norm_relu_grads(x.double(), weight.double(), bias.double(), grad.double(), 1e-5, True)
    ours = ops.bn_relu_backward(grad, x, mean, invstd, weight, bias, True)
    theirs = _batch_norm_relu_grads(x.float(), weight, bias, grad.float(), 1e-5, True)
    theirs = (theirs[0].to(dtype), theirs[1], theirs[2])
    for name, a, b, e in zip(("input", "weight", "bias"), ours, theirs, exact):
        assert rel_error(a, e) <= 2 * rel_error(b, e) + 1e-6, name


# --- gradcheck ----------------------------------------------------------------


def test_gradcheck_channel_stats():
    x = channel_slice(batch=2, channels=3, height=2, width=3).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.channel_stats(t), (x,))


def test_gradcheck_bn_relu():
    x = channel_slice(batch=2, channels=3, height=2, width=3).detach().requires_grad_()
    weight, bias = (v.requires_grad_() for v in bn_vectors(3))
    mean, invstd = (v.detach().requires_grad_() for v in stats_of(x.detach()))
    assert torch.autograd.gradcheck(ops.bn_relu, (x, mean, invstd, weight, bias))


def test_composed_ops_give_batch_norm_gradients():
    """channel_stats → rsqrt → bn_relu under autograd equals relu(batch_norm)
    and equals the fused batch-statistics backward."""
    x = channel_slice(batch=2, channels=3, height=3, width=3).detach().requires_grad_()
    weight, bias = bn_vectors(3)
    grad = torch.randn(x.shape, dtype=torch.float64)
    mean, var = ops.channel_stats(x)
    ops.bn_relu(x, mean, torch.rsqrt(var + 1e-5), weight, bias).backward(grad)
    expected = _batch_norm_relu_grads(x, weight, bias, grad, 1e-5, True)[0]
    fused = ops.bn_relu_backward(grad, x.detach(), mean.detach(), torch.rsqrt(var.detach() + 1e-5), weight, bias, True)[0]
    assert rel_error(x.grad, expected) <= 1e-12
    assert rel_error(fused, expected) <= 1e-12


# --- opcheck ------------------------------------------------------------------


def _bn_args(requires_grad):
    x = channel_slice(batch=2, channels=3, height=3, width=2)
    weight, bias = bn_vectors(3)
    mean, invstd = stats_of(x)
    args = [x.contiguous(), mean, invstd, weight, bias]
    return [a.detach().clone().requires_grad_(requires_grad) for a in args]


def test_opcheck_channel_stats():
    torch.library.opcheck(ops.channel_stats.default, (_bn_args(True)[0],))
    torch.library.opcheck(ops.channel_stats.default, (channel_slice(),))


def test_opcheck_bn_relu():
    torch.library.opcheck(ops.bn_relu.default, tuple(_bn_args(True)))
    out = torch.empty(2, 3, 3, 2, dtype=torch.float64)
    torch.library.opcheck(ops.bn_relu_out.default, (*_bn_args(False), out))


@pytest.mark.parametrize("batch_stats", [True, False])
def test_opcheck_bn_relu_backward(batch_stats):
    x, mean, invstd, weight, bias = _bn_args(False)
    grad = torch.randn_like(x)
    torch.library.opcheck(ops.bn_relu_backward.default, (grad, x, mean, invstd, weight, bias, batch_stats))
    grad_sum = torch.randn_like(x)
    torch.library.opcheck(
        ops.bn_relu_backward_accumulate.default, (grad, x, mean, invstd, weight, bias, batch_stats, grad_sum)
    )


@pytest.mark.parametrize("momentum", [0.1, None])
def test_opcheck_update_running_stats(momentum):
    running = [torch.rand(4, dtype=torch.float64) for _ in range(4)]
    args = (
        running[:2], running[2:], [torch.tensor(3), torch.tensor(0)],
        [torch.randn(4, dtype=torch.float64) for _ in range(2)],
        [torch.rand(4, dtype=torch.float64) for _ in range(2)],
        [momentum, 0.3], 12,
    )
    torch.library.opcheck(ops.update_running_stats.default, args)


def _block_forward_args(training, drop_rate=0.0, recompute=False, requires_grad=True, bn_size=2):
    block, _ = make_pair(2, 3, 2, bn_size=bn_size, drop_rate=drop_rate)
    block.train(training)

    def norm_args(norms):
        running = lambda stat: [None if training else getattr(n, stat) for n in norms]  # noqa: E731
        return [n.weight for n in norms], [n.bias for n in norms], running("running_mean"), running("running_var"), [n.eps for n in norms]

    block.requires_grad_(requires_grad)
    layers = list(block.values())
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=requires_grad)
    return (
        x, *norm_args([l.norm1 for l in layers]), [l.conv1.weight for l in layers],
        *norm_args([l.norm2 for l in layers if bn_size]), [l.conv2.weight for l in layers if bn_size],
        drop_rate if training else 0.0, recompute, requires_grad, "", 0,
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "recompute, bn_size", [(False, 2), (True, 2), (False, 0)], ids=["keep-bottleneck", "recompute", "plain"]
)
def test_opcheck_dense_block_forward(training, recompute, bn_size):
    for requires_grad in (True, False):
        args = _block_forward_args(training, recompute=recompute, requires_grad=requires_grad, bn_size=bn_size)
        torch.library.opcheck(ops.dense_block_forward.default, args)


def test_opcheck_dense_block_forward_with_dropout():
    # Random masks differ between the eager and compiled runs that
    # test_aot_dispatch_dynamic compares, so only schema and fake kernel here;
    # the seeded parity tests cover the values.
    torch.library.opcheck(
        ops.dense_block_forward.default,
        _block_forward_args(True, drop_rate=0.5),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bn_size", [2, 0], ids=["bottleneck", "plain"])
def test_opcheck_dense_block_backward(training, bn_size):
    args = _block_forward_args(training, drop_rate=0.3, bn_size=bn_size)
    with torch.no_grad():
        output, bottlenecks, *stats, masks = ops.dense_block_forward(*args)
    params = [[t.detach() if isinstance(t, torch.Tensor) else t for t in lst] if isinstance(lst, list) else lst for lst in args[1:13]]
    grad = torch.randn_like(output)
    torch.library.opcheck(
        ops.dense_block_backward.default,
        (grad, output, *params, bottlenecks, *stats, masks, args[13], "", 0),
    )


# --- bad arguments ----------------------------------------------------------


def test_op_errors_name_expected_and_given():
    x, mean, invstd, weight, bias = _bn_args(False)
    with pytest.raises(ValueError, match=r"expected input to be a 4-D tensor.*got a 3-D"):
        ops.bn_relu(x[0], mean, invstd, weight, bias)
    with pytest.raises(ValueError, match=r"expected weight of shape \[3\].*got shape \[4\]"):
        ops.bn_relu(x, mean, invstd, torch.ones(4, dtype=torch.float64), bias)
    with pytest.raises(TypeError, match=r"expected input to be floating point, got Long"):
        ops.channel_stats(x.long())
    with pytest.raises(TypeError, match=r"expected out of dtype Double.*got Float"):
        ops.bn_relu_out(x, mean, invstd, weight, bias, torch.empty(x.shape))
    with pytest.raises(ValueError, match=r"grad_output of shape"):
        ops.bn_relu_backward(x[:1], x, mean, invstd, weight, bias, True)
    with pytest.raises(ValueError, match=r"count .* must be 0 or at least 2, got 1"):
        ops.update_running_stats([mean.clone()], [invstd.clone()], [torch.tensor(0)], [mean], [invstd], [0.1], 1)


def test_block_op_errors_name_expected_and_given():
    args = list(_block_forward_args(True, requires_grad=False))
    bad_input = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected an input with 3 channels.*got input of shape \[2, 4, 3, 3\]"):
        ops.dense_block_forward(bad_input, *args[1:])
    wrong_conv = list(args[6])
    wrong_conv[1] = torch.randn(4, 6, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 2 conv1.weight should have shape \[4, 5, 1, 1\], got \[4, 6, 1, 1\]"):
        ops.dense_block_forward(*args[:6], wrong_conv, *args[7:])
    with pytest.raises(TypeError, match=r"layer 1 norm1.weight has dtype Float but the input has dtype Double"):
        ops.dense_block_forward(args[0], [args[1][0].float(), args[1][1]], *args[2:])
    with pytest.raises(ValueError, match=r"dropout probability has to be between 0 and 1, got 1.5"):
        ops.dense_block_forward(*args[:13], 1.5, *args[14:])  # dropout_p
