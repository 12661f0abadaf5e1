"""Memory claims, measured: bytes autograd saves for backward (each storage
once, parameters and buffers left out) equal the analytic model for efficient
mode, grow linearly in depth, and are a small fraction of naive mode's."""

import gc
import os

import pytest
import torch

from conftest import make_pair
from densenet_efficient.memory import dense_block_saved_bytes, saved_tensor_bytes

BATCH, SIZE, C0, K = 2, 8, 24, 12


def measured_saved_bytes(block, x):
    state = [*block.parameters(), *block.buffers()]
    _, nbytes = saved_tensor_bytes(block, x, ignore=state)
    return nbytes


def block_and_input(num_layers, mode="efficient", dtype=torch.float32, **kwargs):
    block, _ = make_pair(num_layers, C0, K, dtype=dtype, mode=mode, **kwargs)
    x = torch.randn(BATCH, C0, SIZE, SIZE, dtype=dtype, requires_grad=True)
    return block, x


@pytest.mark.parametrize("num_layers", [4, 8, 16, 32])
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="float32"),
        pytest.param({"recompute_bottleneck": True}, id="recompute"),
        pytest.param({"drop_rate": 0.2}, id="dropout"),
        pytest.param({"dtype": torch.float64}, id="float64"),
        pytest.param({"dtype": torch.bfloat16}, id="bfloat16"),
        pytest.param({"bn_size": 0}, id="plain-layers"),
    ],
)
def test_efficient_saved_bytes_equal_the_model(num_layers, options):
    block, x = block_and_input(num_layers, **options)
    predicted = dense_block_saved_bytes(
        (BATCH, C0, SIZE, SIZE), num_layers, K,
        bn_size=options.get("bn_size", 4),
        dtype=options.get("dtype", torch.float32),
        drop_rate=options.get("drop_rate", 0.0),
        recompute_bottleneck=options.get("recompute_bottleneck", False),
    )
    assert measured_saved_bytes(block, x) == predicted


def test_frozen_batchnorm_saves_the_same():
    block, x = block_and_input(8)
    block.eval()
    assert measured_saved_bytes(block, x) == dense_block_saved_bytes((BATCH, C0, SIZE, SIZE), 8, K)


def test_nothing_saved_without_grad():
    block, x = block_and_input(8)
    with torch.no_grad():
        assert measured_saved_bytes(block, x) == 0


def test_efficient_grows_linearly_naive_quadratically():
    depths = [4, 8, 16, 32]
    efficient = [measured_saved_bytes(*block_and_input(L)) for L in depths]
    naive = [measured_saved_bytes(*block_and_input(L, mode="naive")) for L in depths]
    # Equal steps in depth (8→16→32 doubles) give equal second differences
    # of zero for a line, growing ones for a quadratic.
    assert efficient[3] - efficient[2] == 2 * (efficient[2] - efficient[1]) == 4 * (efficient[1] - efficient[0])
    assert naive[3] - naive[2] > 2.5 * (naive[2] - naive[1])


def test_efficient_is_at_most_a_sixth_of_naive_at_depth_32():
    efficient = measured_saved_bytes(*block_and_input(32))
    naive = measured_saved_bytes(*block_and_input(32, mode="naive"))
    checkpoint = measured_saved_bytes(*block_and_input(32, mode="checkpoint"))
    recompute = measured_saved_bytes(*block_and_input(32, recompute_bottleneck=True))
    assert efficient * 6 <= naive, (efficient, naive)
    assert recompute < efficient < checkpoint < naive, (recompute, efficient, checkpoint, naive)


def _rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_no_leak_over_fifty_training_steps():
    block, _ = make_pair(6, 16, 8, dtype=torch.float32, drop_rate=0.1)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.01, momentum=0.9)
    state = [*block.parameters(), *block.buffers()]
    x = torch.randn(4, 16, 16, 16)
    saved, rss = [], []
    for step in range(50):
        optimizer.zero_grad(set_to_none=True)
        out, nbytes = saved_tensor_bytes(block, x, ignore=state)
        out.square().mean().backward()
        optimizer.step()
        del out
        saved.append(nbytes)
        if step in (10, 49):
            gc.collect()
            rss.append(_rss_bytes())
    assert len(set(saved)) == 1, saved
    growth = rss[1] - rss[0]
    assert growth < 8 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB between steps 10 and 49"


def _model_cases():
    from densenet_efficient import models

    return [
        pytest.param(lambda **k: models.densenet_bc(16, 6, **k), 32, id="densenet-bc-16-6"),
        pytest.param(lambda **k: models.densenet_cifar(13, 4, **k), 32, id="plain-13-4"),
        pytest.param(lambda **k: models.DenseNet(4, (2, 3), 8, **k), 48, id="imagenet-stem"),
    ]


@pytest.mark.parametrize("build, size", _model_cases())
@pytest.mark.parametrize(
    "mode, recompute",
    [("naive", False), ("checkpoint", False), ("efficient", False), ("efficient", True)],
    ids=["naive", "checkpoint", "efficient", "efficient-recompute"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_whole_model_saved_bytes_equal_the_model(build, size, mode, recompute, training, drop_rate):
    from densenet_efficient.memory import model_saved_bytes

    torch.manual_seed(0)
    model = build(mode=mode, recompute_bottleneck=recompute, drop_rate=drop_rate).train(training)
    x = torch.randn(3, 3, size, size)
    _, measured = saved_tensor_bytes(model, x, ignore=[*model.parameters(), *model.buffers()])
    assert measured == model_saved_bytes(model, (3, 3, size, size))


def test_whole_model_saved_bytes_float64_and_mixed_modes():
    from densenet_efficient import models
    from densenet_efficient.memory import model_saved_bytes

    model = models.densenet_bc(22, 6).double()
    model.features.denseblock2.mode = "naive"
    model.features.denseblock3.mode = "checkpoint"
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _, measured = saved_tensor_bytes(model, x, ignore=[*model.parameters(), *model.buffers()])
    assert measured == model_saved_bytes(model, (2, 3, 32, 32), dtype=torch.float64)


@pytest.mark.parametrize("mode", ["naive", "checkpoint", "efficient"])
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 3, 64)], ids=["2d", "1d"])
def test_autocast_saved_bytes_estimate_equals_the_model(mode, shape):
    """Under autocast the estimate counts the classifier's bfloat16 weight
    copy (it was left out) and no copy of a checkpointed layer's 1×1 weight
    (run again in backward; it was counted)."""
    from densenet_efficient import models
    from densenet_efficient.memory import estimate_training_step

    torch.manual_seed(0)
    model = models.DenseNet(8, (2, 3, 2), 16, spatial_dims=len(shape) - 2, mode=mode)
    x = torch.randn(shape)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    _, measured = saved_tensor_bytes(forward, ignore=[*model.parameters(), *model.buffers()])
    estimate = estimate_training_step(model, shape, autocast_dtype=torch.bfloat16, device_type="cpu")
    assert estimate.saved == measured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_synchronised_backward_allocates_no_more_than_the_plain_one(one_rank_world, dtype):
    """Synchronised BatchNorm all-reduces two per-channel sums between the
    passes of backward and writes the input gradient straight where it goes:
    no full-size temporaries beyond those of the plain block (which the
    memory model counts), measured as the backward's allocation peak."""
    from densenet_efficient.allocations import allocation_peak

    peaks = {}
    for synced in (False, True):
        block, x = block_and_input(6, dtype=dtype)
        if synced:
            block.sync_group = torch.distributed.group.WORLD.group_name
        out = block(x)
        grad = torch.randn_like(out)
        _, peaks[synced] = allocation_peak(out.backward, grad)
    one_map = BATCH * (C0 + 6 * K) * SIZE * SIZE * x.element_size()  # the block's output
    assert peaks[True] <= peaks[False] + one_map // 16, peaks
