"""Mixed precision: under torch.autocast the efficient block runs its
convolutions in the autocast dtype while BatchNorm keeps float32 parameters,
statistics and arithmetic; low-precision models work too. Accuracy is judged
against a float64 reference: at most 2x the naive model's error run the same
way (plus a small floor where PyTorch happens to be near exact).

Low-precision rounding flips a few ReLU gates, and with few values per
channel one flip moves a channel's gradient by percent; the shapes here keep
512 values per channel so that the comparison measures arithmetic, not which
gates happened to flip (at 144 values per channel the ratio ranged 0.2-5x by
seed, both implementations alike)."""

import copy

import pytest
import torch

from conftest import make_pair, rel_error, requires_cuda

CPU = pytest.param("cpu", id="cpu")
CUDA = pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda], id="cuda")
FLOOR = 2e-3  # a few bf16 ulps
BATCH, C0, K, LAYERS, SIZE = 8, 16, 8, 4, 8


def _run(block, x, grad, autocast_dtype=None):
    x = x.detach().clone().requires_grad_()
    for p in block.parameters():
        p.grad = None
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = block(x)
    out.backward(grad.to(out.dtype))
    results = {"output": out.detach(), "input.grad": x.grad}
    results.update({f"{n}.grad": p.grad for n, p in block.named_parameters()})
    results.update({n: b.clone() for n, b in block.named_buffers() if "running" in n})
    return results


def _errors(results, exact):
    return {k: rel_error(v, exact[k]) for k, v in results.items()}


def _assert_within_twice_naive(ours, naive, exact):
    ours_err, naive_err = _errors(ours, exact), _errors(naive, exact)
    for name, err in ours_err.items():
        assert err <= 2 * naive_err[name] + FLOOR, f"{name}: {err:.3g} vs naive {naive_err[name]:.3g}"


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, id="float16")])
# 2×2 planes, as many values per channel: the CPU's 1×1 convolutions of narrow planes (one GEMM over all
# samples); one pixel: the CPU's 3×3 convolutions too are GEMMs (their centre tap).
@pytest.mark.parametrize(
    "batch, size", [(BATCH, SIZE), (BATCH * SIZE**2 // 4, 2), (BATCH * SIZE**2, 1)], ids=["8x8", "2x2", "1x1"])
def test_autocast_matches_naive_accuracy(device, dtype, batch, size):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast runs bfloat16")
    ours, naive = (m.float().to(device) for m in make_pair(LAYERS, C0, K))
    exact = make_pair(LAYERS, C0, K, dtype=torch.float64)[1].to(device)
    generator = torch.Generator().manual_seed(5)
    # Inside a network under autocast a block's input comes from a conv: already low precision.
    x = torch.randn(batch, C0, size, size, generator=generator).to(device=device, dtype=dtype)
    grad = torch.randn(batch, C0 + LAYERS * K, size, size, generator=generator).to(device=device, dtype=dtype)
    mine = _run(ours, x, grad, dtype)
    theirs = _run(naive, x, grad, dtype)
    assert mine["output"].dtype == theirs["output"].dtype == dtype
    for name, p in ours.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    for name, b in ours.named_buffers():
        if "running" in name:
            assert b.dtype == torch.float32, name
    _assert_within_twice_naive(mine, theirs, _run(exact, x.double(), grad.double()))


def test_autocast_keeps_no_low_precision_weight_copies_for_backward():
    """Autocast casts a convolution's weight on every call, and the
    convolution saves that copy for backward: a naive block keeps one per
    convolution. An efficient block casts a layer's weights inside its
    operator and keeps none (it keeps the float32 parameters, there anyway)."""
    ours, naive = (m.float() for m in make_pair(LAYERS, C0, K))
    weight_shapes = {tuple(p.shape) for n, p in ours.named_parameters() if "conv" in n}
    x = torch.randn(BATCH, C0, SIZE, SIZE, dtype=torch.bfloat16)

    def saved_weight_copies(block) -> int:
        copies = []

        def pack(t):
            if t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes:
                copies.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            block(x)
        return len(copies)

    assert saved_weight_copies(naive) == 2 * LAYERS
    assert saved_weight_copies(ours) == 0


def test_autocast_casts_a_float32_input():
    block = make_pair(2, 4, 2, dtype=torch.float32)[0]
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:, :4], x.to(torch.bfloat16))


def test_float64_input_is_left_alone_by_autocast():
    block = make_pair(2, 4, 2, dtype=torch.float64)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(torch.randn(2, 4, 5, 5, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, id="float16")])
def test_low_precision_model(device, dtype):
    """model.to(dtype): parameters, buffers and input all in half/bfloat16."""
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 convolutions on CPU are not a supported configuration here")
    ours, naive = (m.to(device=device, dtype=dtype) for m in make_pair(LAYERS, C0, K))
    exact = copy.deepcopy(naive).double()  # the same rounded parameters, exact arithmetic
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(BATCH, C0, SIZE, SIZE, generator=generator).to(device=device, dtype=dtype)
    grad = torch.randn(BATCH, C0 + LAYERS * K, SIZE, SIZE, generator=generator).to(device=device, dtype=dtype)
    mine, theirs = _run(ours, x, grad), _run(naive, x, grad)
    assert mine["output"].dtype == dtype
    _assert_within_twice_naive(mine, theirs, _run(exact, x.double(), grad.double()))
