"""The launch diet, measured on the CPU: every operator call is at least one
kernel launch on a GPU, and at CIFAR sizes a step is launch-bound. Per layer
of a training step (forward + backward) the efficient block runs at most 12
compute operators besides its convolutions and at most 100 dispatcher calls,
and it never reads a device value on the host (which would also stop a step
from being captured in a CUDA graph)."""

import pytest
import torch

from conftest import make_pair
from densenet_efficient.operator_count import host_synchronizations, operators_per_layer

COMPUTE_PER_LAYER = 12
DISPATCHER_CALLS_PER_LAYER = 100


@pytest.mark.parametrize(
    "momentum, recompute", [(0.1, False), (None, False), (0.1, True)],
    ids=["momentum", "cumulative-average", "recompute-bottleneck"],
)
def test_operators_per_layer_within_budget(momentum, recompute):
    counts = operators_per_layer(momentum=momentum, recompute_bottleneck=recompute)
    assert counts["compute"] <= COMPUTE_PER_LAYER, counts
    assert counts["dispatcher"] <= DISPATCHER_CALLS_PER_LAYER, counts
    # What remains: two BN-ReLU forwards (recomputed in backward: four), the
    # bottleneck's statistics, the fused copy + statistics of the new
    # features, the two fused BN-ReLU backwards, the sum over the batch
    # of conv1's per-sample weight gradients (a reduction into a zeroed
    # result on the CPU), and on the CPU the new features' gradient laid out
    # for oneDNN's two backward calls (the 3×3's weight gradient, then its
    # input gradient), a copy its one call made inside before.
    assert counts["by_name"] == {
        "aten::copy_": 1.0,
        "aten::fill_": 1.0,
        "densenet_efficient::bn_relu_out": 4.0,
        "densenet_efficient::channel_stats_out": 1.0,
        "densenet_efficient::copy_with_stats": 1.0,
        "densenet_efficient::bn_relu_backward": 1.0,
        "densenet_efficient::bn_relu_backward_accumulate": 1.0,
    }


def test_the_count_sees_what_a_naive_block_runs():
    """The counter is not blind: a naive layer's concatenation, BatchNorms and
    ReLUs (and their backwards) all show up."""
    from densenet_efficient import operator_count

    events = operator_count._profile_step(4, 0.1, False)
    assert operator_count._counts(events)[0]["densenet_efficient::bn_relu_out"] == 4 * 4
    block, _ = make_pair(4, 16, 8, mode="naive", dtype=torch.float32)
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        block(x).sum().backward()
    compute, _ = operator_count._counts(profile.events())
    assert compute["aten::cat"] >= 4 and sum(compute.values()) > 4 * COMPUTE_PER_LAYER


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative-average"])
def test_a_training_step_never_reads_device_values_on_the_host(momentum):
    block, _ = make_pair(3, 6, 4, dtype=torch.float32, momentum=momentum)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    assert host_synchronizations(lambda: block(x).sum().backward()) == []
    assert int(block.denselayer1.norm1.num_batches_tracked) == 1  # the step did update


def test_synchronised_block_counts_and_reduces_on_the_device(one_rank_world):
    """With sync-BN the global count is all-reduced as a tensor (on the
    input's device: NCCL needs that) and nothing is read back on the host."""
    block, _ = make_pair(3, 6, 4, dtype=torch.float32, momentum=None)
    block.sync_group = torch.distributed.group.WORLD.group_name
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    assert host_synchronizations(lambda: block(x).sum().backward()) == []


def _all_reduces(block, x) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with torch.no_grad():
            block(x)
    return [e.name for e in profile.events()].count("_c10d_functional::all_reduce")


def test_synchronised_block_in_eval_makes_no_collective_calls(one_rank_world):
    """In eval no norm needs batch statistics: no all-reduce at all (ranks'
    last eval batches may differ; an all-reduce there could hang)."""
    block, _ = make_pair(3, 6, 4, dtype=torch.float32)
    block.sync_group = torch.distributed.group.WORLD.group_name
    x = torch.randn(2, 6, 5, 5)
    # Training: the count, then two (mean, squared deviations) for the input's
    # channels, each layer's bottleneck and each new feature map but the last.
    assert _all_reduces(block.train(), x) == 1 + 2 * (1 + 3 + 2)
    assert _all_reduces(block.eval(), x) == 0
