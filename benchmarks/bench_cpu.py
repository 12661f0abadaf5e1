"""CPU micro-benchmarks (``make bench``; not part of ``make test``): our
per-channel operators in float32, bfloat16 and float16 against their ATen
equivalents (in float32), a dense block's forward
+ backward per mode, and a DenseNet-BC-100-12 training step per mode (the CPU
target: efficient within 1.2x of naive)."""

import pytest
import torch
import torch.nn.functional as F

from densenet_efficient import DenseBlock, models
from densenet_efficient._ops import ops
from densenet_efficient.operator_count import operators_per_layer

MODES = {"naive": ("naive", False), "checkpoint": ("checkpoint", False),
         "efficient": ("efficient", False), "efficient+recompute": ("efficient", True)}
SHAPE = (16, 256, 32, 32)


# The per-channel operators in every precision a user can pick (float32
# BatchNorm parameters, as under autocast); ATen's references in float32.
@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16, torch.float16],
                ids=["float32", "bfloat16", "float16"])
def per_channel(request):
    torch.manual_seed(0)
    x = torch.randn(SHAPE).to(request.param)
    weight, bias = torch.rand(SHAPE[1]) + 0.5, torch.randn(SHAPE[1]) * 0.1
    mean, var = ops.channel_stats(x)
    return {"x": x, "weight": weight, "bias": bias, "mean": mean, "var": var,
            "invstd": torch.rsqrt(var + 1e-5),
            "grad": torch.randn_like(x), "out": torch.empty_like(x), "grad_sum": torch.zeros_like(x)}


@pytest.mark.benchmark(group=f"channel statistics {list(SHAPE)}")
def test_channel_stats(benchmark, per_channel):
    benchmark(ops.channel_stats, per_channel["x"])


@pytest.mark.benchmark(group=f"channel statistics {list(SHAPE)}")
def test_aten_var_mean(benchmark, per_channel):
    benchmark(torch.var_mean, per_channel["x"], (0, 2, 3))


@pytest.mark.benchmark(group=f"channel statistics {list(SHAPE)}")
def test_copy_with_stats(benchmark, per_channel):
    t = per_channel
    benchmark(ops.copy_with_stats, t["x"], t["out"], t["mean"], t["var"])


@pytest.mark.benchmark(group=f"batch norm + relu forward {list(SHAPE)}")
def test_bn_relu_out(benchmark, per_channel):
    t = per_channel
    benchmark(ops.bn_relu_out, t["x"], t["mean"], t["var"], t["weight"], t["bias"], 1e-5, t["out"])


@pytest.mark.benchmark(group=f"batch norm + relu forward {list(SHAPE)}")
def test_aten_batch_norm_relu(benchmark, per_channel):
    t = per_channel
    x = t["x"].float()  # ATen's CPU batch norm wants one dtype throughout
    benchmark(lambda: F.batch_norm(x, None, None, t["weight"], t["bias"], True).relu_())


@pytest.mark.benchmark(group=f"batch norm + relu backward {list(SHAPE)}")
def test_bn_relu_backward(benchmark, per_channel):
    t = per_channel
    benchmark(ops.bn_relu_backward, t["grad"], t["x"], t["mean"], t["var"], t["weight"], t["bias"], 1e-5, True)


@pytest.mark.benchmark(group=f"batch norm + relu backward {list(SHAPE)}")
def test_bn_relu_backward_accumulate(benchmark, per_channel):
    t = per_channel
    benchmark(ops.bn_relu_backward_accumulate, t["grad"], t["x"], t["mean"], t["var"], t["weight"], t["bias"],
              1e-5, True, t["grad_sum"])


@pytest.mark.benchmark(group=f"batch norm + relu backward {list(SHAPE)}")
def test_aten_native_batch_norm_backward(benchmark, per_channel):
    t = per_channel
    benchmark(torch.ops.aten.native_batch_norm_backward, t["grad"].float(), t["x"].float(), t["weight"], None, None,
              t["mean"], t["invstd"], True, 1e-5, [True, True, True])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.benchmark(group="dense block forward+backward (L=16, C0=24, k=12, batch 16, 32x32)")
def test_block_forward_backward(benchmark, mode):
    torch.manual_seed(0)
    block_mode, recompute = MODES[mode]
    block = DenseBlock(16, 24, 12, mode=block_mode, recompute_bottleneck=recompute)
    x = torch.randn(16, 24, 32, 32, requires_grad=True)
    benchmark.pedantic(lambda: block(x).square().mean().backward(), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.benchmark(group="DenseNet-BC-100-12 training step (batch 16, forward+backward+SGD)")
def test_densenet_bc_100_12_step(benchmark, mode):
    torch.manual_seed(0)
    block_mode, recompute = MODES[mode]
    model = models.densenet_bc_100_12(mode=block_mode, recompute_bottleneck=recompute)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    benchmark.pedantic(step, rounds=7, warmup_rounds=1)


@pytest.mark.benchmark(group="operators per layer of an efficient block step (forward+backward)")
def test_operators_per_layer(benchmark, capsys):
    """The launch diet: compute operators besides convolutions and dispatcher
    calls per layer (densenet_efficient.operator_count), printed and kept in
    the benchmark JSON's extra_info; the time is that of the measurement."""
    counts = benchmark.pedantic(operators_per_layer, rounds=1, iterations=1)
    benchmark.extra_info.update(counts)
    with capsys.disabled():
        print(f"\noperators per layer: {counts['compute']:g} compute (besides convolutions), "
              f"{counts['dispatcher']:g} dispatcher calls; {counts['by_name']}")
